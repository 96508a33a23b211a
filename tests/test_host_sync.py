"""No host synchronisation inside a training step, for every registered method.

A host read of a device tensor (``.item()``, ``bool(t)``, ``.cpu()``...) costs little on a CPU but
stalls a GPU's queue every step. Each method trains a few steps on the tiny data while the tensor
operations that force a host read are counted whenever ``ted_scale``'s own code calls them inside
``Trainer._train_step`` (forward, backward and optimizer step of every micro-batch); the metrics
line at the log interval, checkpoints and evaluation lie outside it and may read. DeepSpeed's own
reads in ``engine.step()`` (its gradient-norm clipping) are not this project's code: they are
counted apart and only reported. The CUDA variant runs the same steps under
``torch.cuda.set_sync_debug_mode("warn")`` and fails on a warning raised from this package
("error" would stop at DeepSpeed's own clipping read first).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import ted_scale
from ted_scale.distill.methods import get_method, load_run_config, method_names
from ted_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(Path(ted_scale.__file__).parent)
PACKAGE_NAME = "ted_scale."
CONFIGS = {
    "ted": "tiny-ted.yaml",
    "ted_kl": "tiny-ted.yaml",
    "kd": "tiny-kd.yaml",
    "lwd": "tiny-lwd.yaml",
    "lm": "tiny-kd.yaml",
    "cr_ild": "tiny-cr-ild.yaml",
    "minidisc": "tiny-minidisc.yaml",
}
# Each forces the host to wait for the device when the tensor lives there.
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
# Functions whose reads are of CPU tensors on every run (a CUDA one too), never a device wait.
HOST_SIDE = {("distill/methods/cr_ild.py", "_beta")}  # MixupDraw: lambda from a CPU generator


class SyncCounter:
    """Counts host reads by caller file and line while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.ours: Counter[str] = Counter()
        self.theirs: Counter[str] = Counter()

    def record(self, what: str) -> None:
        if not self.active:
            return
        code = sys._getframe(2).f_code  # the function that called the patched tensor method
        where = f"{code.co_filename}:{sys._getframe(2).f_lineno} {what}"
        if not code.co_filename.startswith(PACKAGE):
            self.theirs[where] += 1
        elif (code.co_filename.removeprefix(PACKAGE + "/"), code.co_name) not in HOST_SIDE:
            self.ours[where] += 1


def _counting(counter: SyncCounter, name: str, original):
    def method(self, *args, **kwargs):
        counter.record(name)
        return original(self, *args, **kwargs)

    return method


def _counting_to(counter: SyncCounter, original):
    def to(self, *args, **kwargs):
        target = next((a for a in args if isinstance(a, str | torch.device)), kwargs.get("device"))
        to_cpu = target is not None and torch.device(target).type == "cpu"
        if to_cpu and not kwargs.get("non_blocking", False):
            counter.record("to(cpu)")
        return original(self, *args, **kwargs)

    return to


@pytest.fixture
def counted(monkeypatch) -> SyncCounter:
    """A SyncCounter hooked into every host-reading tensor method and into ``_train_step``."""
    counter = SyncCounter()
    for name in READS:
        monkeypatch.setattr(
            torch.Tensor, name, _counting(counter, name, getattr(torch.Tensor, name))
        )
    monkeypatch.setattr(torch.Tensor, "to", _counting_to(counter, torch.Tensor.to))
    step = Trainer._train_step

    def counted_step(self, *args, **kwargs):
        counter.active = True
        try:
            return step(self, *args, **kwargs)
        finally:
            counter.active = False

    monkeypatch.setattr(Trainer, "_train_step", counted_step)
    return counter


def _short_run(name: str, tiny_data: Path, run_dir: Path):
    overrides = [
        f"method={name}", f"data.path={tiny_data}", f"output_dir={run_dir}",
        "stage1.max_steps=2", "stage2.max_steps=3", "minidisc.sandwich.max_steps=2",
        "log.interval=1000", "checkpoint.interval=0", "eval.interval=0",
    ]  # fmt: skip
    if name == "lm":
        overrides.append("student.init=random")
    return load_run_config(REPO / "configs" / CONFIGS[name], overrides)


def test_every_built_in_method_is_covered():
    # A plug-in registered by another test file exists only in this process.
    built_in = {
        m for m in method_names() if type(get_method(m)).__module__.startswith(PACKAGE_NAME)
    }
    assert built_in <= set(CONFIGS), "a method without a host-sync check"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_training_step_reads_nothing_back_to_the_host(name, tiny_data, tmp_path, counted):
    Trainer(_short_run(name, tiny_data, tmp_path / "run")).run()
    assert not counted.ours, f"host reads in the step: {dict(counted.ours)}"


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_cuda_training_step_syncs_nowhere_in_our_code(name, tiny_data, tmp_path, monkeypatch):
    """torch's sync debug mode ("warn") inside every step; a warning raised from this package's
    code is a sync of ours (DeepSpeed's gradient-norm clipping warns from DeepSpeed's files)."""
    import warnings

    step = Trainer._train_step
    caught: list[warnings.WarningMessage] = []

    def strict_step(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                result = step(self, *args, **kwargs)
            caught.extend(seen)
            return result
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_train_step", strict_step)
    Trainer(_short_run(name, tiny_data, tmp_path / "run")).run()
    ours = [
        f"{w.filename}:{w.lineno} {w.message}" for w in caught if w.filename.startswith(PACKAGE)
    ]
    assert not ours, ours
