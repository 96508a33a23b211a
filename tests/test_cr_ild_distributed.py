"""CR-ILD on two CPU ranks (gloo): the two-stage run under the `deepspeed` launcher with ZeRO-2 and
the joint run under `torchrun` with ZeRO-3. Same global batch as one rank, and one mixup lambda per
global micro-batch slot whatever the layout, so the losses must match the single-process runs."""

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

KEYS = ("loss", "loss_layer", "loss_consistency", "loss_ce")


def _losses(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        (r["stage"], r["step"], *(r.get(k) for k in KEYS))
        for r in map(json.loads, lines)
        if "loss" in r
    ]


def _run(env, launcher: list[str], out: Path, data: Path, *overrides: str) -> list[tuple]:
    cmd = [
        *launcher,
        str(REPO / "launch" / "pretrain_ted.py"),
        "--config",
        str(REPO / "configs" / "tiny-cr-ild.yaml"),
        f"data.path={data}",
        f"output_dir={out}",
        "stage1.max_steps=4",
        "stage2.max_steps=4",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return _losses(out)


def _assert_same_losses(a, b) -> None:
    """Same phases, steps and logged parts; values within 1e-4 (the reduction order differs)."""
    assert [[v is None for v in r] for r in a] == [[v is None for v in r] for r in b]
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b, strict=True):
        numbers = [(u, v) for u, v in zip(x[2:], y[2:], strict=True) if v is not None]
        assert [u for u, _ in numbers] == pytest.approx([v for _, v in numbers], rel=1e-4)


@pytest.mark.skipif(
    shutil.which("deepspeed", path=str(VENV_BIN)) is None, reason="no deepspeed launcher"
)
def test_two_stage_on_two_ranks_under_the_deepspeed_launcher_with_zero2(
    tiny_data, tmp_path, subprocess_env
):
    single = _run(subprocess_env, [sys.executable], tmp_path / "single", tiny_data)
    assert [r[0] for r in single] == ["ild"] * 4 + ["stage2"] * 4
    two = _run(
        subprocess_env,
        [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29527"],
        tmp_path / "two",
        tiny_data,
        "deepspeed.zero_stage=2",
    )
    _assert_same_losses(two, single)


def test_joint_on_two_ranks_under_torchrun_with_zero3(tiny_data, tmp_path, subprocess_env):
    single = _run(
        subprocess_env, [sys.executable], tmp_path / "single", tiny_data, "cr_ild.stages=joint"
    )
    two = _run(
        subprocess_env,
        [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29529"],
        tmp_path / "two",
        tiny_data,
        "cr_ild.stages=joint",
        "deepspeed.zero_stage=3",
    )
    _assert_same_losses(two, single)
    assert (tmp_path / "two" / "student_hf" / "model.safetensors").is_file()
