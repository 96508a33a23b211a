"""Two CPU ranks (gloo): the tiny Stage I + Stage II run under the `deepspeed` launcher with ZeRO-2
and under `torchrun` with ZeRO-3 (the frozen teacher beside a ZeRO-3 engine). Same global batch as
one rank, so the losses must match the single-process run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
