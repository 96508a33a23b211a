"""`make gpu-check`: refuses at once without CUDA; its report machinery on real commands."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ted_scale.bench.gpu_report import NO_CUDA, Piece, pieces, write_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check would really run")
def test_fails_at_once_without_cuda(tmp_path, subprocess_env):
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        [sys.executable, "launch/gpu_check.py", "--out", str(out)],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip() == NO_CUDA == "no CUDA device: nothing to check"
    assert done.stdout == "" and not out.exists()  # nothing ran, nothing written


def test_makefile_target_runs_the_launch_script():
    makefile = (REPO / "Makefile").read_text()
    assert "\ngpu-check: setup\n\t$(PY) launch/gpu_check.py\n" in makefile


def test_pieces_cover_tests_benchmarks_and_kernel_report(tmp_path):
    commands = [" ".join(p.command) for p in pieces(tmp_path)]
    assert any("-m pytest" in c and "-m cuda" in c for c in commands)
    assert any(
        "-m ted_scale.cli.bench_throughput --preset gpt2 --prefetch on,off --compile on,off" in c
        for c in commands
    )
    assert any("-m ted_scale.cli.bench_losses --kernel-report" in c for c in commands)
    for piece in pieces(tmp_path):  # modules, not paths: they run from an installed package too
        assert not any(a.endswith(".py") for a in piece.command), piece.command
        module = piece.command[piece.command.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module


def test_report_lists_every_piece_and_fails_when_one_fails(tmp_path):
    checks = [
        Piece("passes", [sys.executable, "-c", "print('all good')"]),
        Piece("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
    ]
    assert write_check(tmp_path, checks, cwd=REPO, log=lambda _: None) == 1
    report = (tmp_path / "report.md").read_text()
    assert "FAILED (1 of 2 pieces)" in report
    assert "| passes | pass |" in report and "| fails | FAIL (exit 3) |" in report
    assert report.index("## passes") < report.index("all good") < report.index("## fails")
    assert "boom" in report and "- torch: " in report
    assert write_check(tmp_path, checks[:1], cwd=REPO, log=lambda _: None) == 0
    assert "all passed" in (tmp_path / "report.md").read_text()
