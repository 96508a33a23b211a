"""``model.compile``: inductor-compiled blocks compute what eager blocks compute, compile once,
and compose with the trainer (ZeRO, checkpoints, resume). On a CPU inductor emits C++; one
compilation per block shape and mode serves every test here (the FX graph cache keeps it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils

from ted_scale.bench.presets import Preset, Spec
from ted_scale.bench.throughput import ProjectStep
from ted_scale.distill.methods import load_run_config, method_names
from ted_scale.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
PRESET = Preset(4, 2, 64, 4, 512, 64, 2, warmup=0, steps=1, instrumented=0)


def _loss_and_grads(method: str, compiled: bool, run_dir: Path):
    step = ProjectStep(
        PRESET, Spec(method, True, False, "sdpa", compile=compiled), torch.device("cpu"), run_dir
    )
    step.module.eval()  # no dropout: the same function on both sides
    torch.manual_seed(0)
    ids = torch.randint(0, PRESET.vocab, (2, PRESET.seq_len))
    labels = torch.randint(0, PRESET.vocab, (2, PRESET.seq_len))
    tapped = step.tapper(ids) if step.tapper is not None else None
    loss, parts = step.module(ids, labels, tapped)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in step.module.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in parts.items()}, grads


@pytest.mark.parametrize("method", method_names())
def test_compiled_blocks_give_the_eager_losses_and_gradients(method, tmp_path):
    eager_parts, eager_grads = _loss_and_grads(method, False, tmp_path / "eager")
    parts, grads = _loss_and_grads(method, True, tmp_path / "compiled")
    assert parts.keys() == eager_parts.keys()
    for key, value in parts.items():
        assert value == pytest.approx(eager_parts[key], rel=1e-5, abs=1e-6), key
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _config(data: Path, out: Path, *overrides: str):
    return load_run_config(
        REPO / "configs" / "tiny-ted.yaml",
        [f"data.path={data}", f"output_dir={out}", "log.interval=1", *overrides],
    )


def _losses(run: Path) -> list[tuple[str, int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_training_compiled_matches_eager_compiles_once_and_resumes(tiny_data, tmp_path):
    """Stage I and Stage II: compiled losses equal the eager run's; after the first run no new
    graph is compiled; a run resumed from a mid-phase checkpoint continues with the uninterrupted
    losses."""
    common = ("stage1.max_steps=2", "stage2.max_steps=4", "deepspeed.zero_stage=2")
    Trainer(_config(tiny_data, tmp_path / "eager", *common)).run()

    counters = torch._dynamo.utils.counters["stats"]
    run = tmp_path / "compiled"
    compiled = (*common, "model.compile=true", "checkpoint.interval=2")
    Trainer(_config(tiny_data, run, *compiled)).run()
    graphs = counters["unique_graphs"]
    _assert_close(_losses(run), _losses(tmp_path / "eager"), rel=1e-5)

    # Resume Stage II from its step-2 checkpoint: no recompilation, the same losses.
    full = _losses(run)
    shutil.rmtree(run / "checkpoints" / "stage2-step00000004")
    progress = json.loads((run / "progress.json").read_text())
    progress["done"].remove("stage2")
    (run / "progress.json").write_text(json.dumps(progress))
    Trainer(_config(tiny_data, run, *compiled)).run()
    assert _losses(run) == full
    assert counters["unique_graphs"] == graphs, "the second run compiled new graphs"


def test_compiled_blocks_under_zero3_give_the_eager_losses(tiny_data, tmp_path, subprocess_env):
    """ZeRO-3 gathers each block's weights in hooks around the compiled forward. In a process of
    its own: DeepSpeed's ZeRO-3 patches torch.nn.functional.linear for good."""
    common = ["stage=distill", "method=kd", "stage2.max_steps=3", "deepspeed.zero_stage=3"]
    for name, extra in (("eager", []), ("compiled", ["model.compile=true"])):
        cmd = [
            sys.executable, str(REPO / "launch" / "pretrain_ted.py"),
            "--config", str(REPO / "configs" / "tiny-ted.yaml"),
            f"data.path={tiny_data}", f"output_dir={tmp_path / name}", "log.interval=1",
            *common, *extra,
        ]  # fmt: skip
        done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rel=1e-5)


def _assert_close(ours: list, theirs: list, *, rel: float) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], rel=rel)
