"""Two CPU ranks (gloo): the tiny Stage I + Stage II run under the `deepspeed` launcher with ZeRO-2
and under `torchrun` with ZeRO-3 (the frozen teacher beside a ZeRO-3 engine). Same global batch as
one rank, so the losses must match the single-process run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _run(env: dict[str, str], launcher: list[str], out: Path, data: Path, *overrides: str) -> None:
    cmd = [
        *launcher,
        str(REPO / "launch" / "pretrain_ted.py"),
        "--config",
        str(REPO / "configs" / "tiny-ted.yaml"),
        f"data.path={data}",
        f"output_dir={out}",
        "stage1.max_steps=4",
        "stage2.max_steps=8",
        *overrides,
    ]
    proc = subprocess.run(
        cmd,
        env={**env, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process(tiny_data, tmp_path_factory, subprocess_env) -> list[tuple[str, int, float]]:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(subprocess_env, [sys.executable], out, tiny_data)
    losses = _losses(out)
    stage2 = [loss for stage, _, loss in losses if stage == "stage2"]
    assert stage2[-1] < stage2[0], "Stage II loss did not fall"
    return losses


def _assert_same_losses(a, b) -> None:
    assert [(s, n) for s, n, _ in a] == [(s, n) for s, n, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4)


@pytest.mark.skipif(
    shutil.which("deepspeed", path=str(VENV_BIN)) is None, reason="no deepspeed launcher"
)
def test_two_ranks_under_the_deepspeed_launcher_with_zero2(
    tiny_data, tmp_path, single_process, subprocess_env
):
    out = tmp_path / "run"
    _run(
        subprocess_env,
        [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29517"],
        out,
        tiny_data,
        "deepspeed.zero_stage=2",
    )
    _assert_same_losses(_losses(out), single_process)
    assert (out / "student_hf" / "model.safetensors").is_file()


def test_two_ranks_under_torchrun_with_zero3_beside_the_frozen_teacher(
    tiny_data, tmp_path, single_process, subprocess_env
):
    out = tmp_path / "run"
    _run(
        subprocess_env,
        [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29519"],
        out,
        tiny_data,
        "deepspeed.zero_stage=3",
    )
    _assert_same_losses(_losses(out), single_process)
    assert (out / "filters" / "teacher.safetensors").is_file()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_two_ranks_killed_with_dropout_resume_to_the_uninterrupted_student_bit_for_bit(
    tiny_data, tmp_path, subprocess_env
):
    """The whole job killed (launcher and ranks: a node lost) after Stage I, before Stage II's first
    checkpoint, then again mid-Stage II: every rank's generators resume where they were."""
    from safetensors.torch import load_file

    from ted_scale.parallel.dims import free_port

    # Stage II long enough that the job is still running when the kill lands after a checkpoint.
    overrides = ["student.dropout=0.1", "checkpoint.interval=3", "checkpoint.keep=10"]

    def launch(out: Path, *extra: str) -> subprocess.Popen:
        torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"]
        cmd = [
            *torchrun,
            "--master_port",
            str(free_port()),
            str(REPO / "launch" / "pretrain_ted.py"),
        ]
        cmd += ["--config", str(REPO / "configs" / "tiny-ted.yaml"), f"data.path={tiny_data}"]
        cmd += [f"output_dir={out}", "stage1.max_steps=4", "stage2.max_steps=30", *overrides]
        env = {**subprocess_env, "DS_ACCELERATOR": "cpu"}
        return subprocess.Popen(
            [*cmd, *extra], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def finish(proc: subprocess.Popen) -> str:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-4000:]
        return out

    finish(launch(tmp_path / "full"))
    run = tmp_path / "killed"
    for marker in ("progress.json", "checkpoints/stage2-step00000003/complete"):
        proc = launch(run, "resume=auto")
        deadline = time.time() + 300
        while not (run / marker).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        for pid in [proc.pid, *_descendants(proc.pid)]:  # ranks run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
        assert (run / marker).exists(), f"the run ended before writing {marker}"
    assert "stage2: resumed from" in finish(launch(run, "resume=auto"))

    expected, got = (
        load_file(r / "student_hf" / "model.safetensors") for r in (tmp_path / "full", run)
    )
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
