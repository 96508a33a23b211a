"""``make gpu-check``: every check that needs a GPU, in one command, into one Markdown report.

Pieces, each a command run from the repository root with its output captured:

1. the ``cuda``-marked tests (``pytest -m cuda``): every CUDA test of the suite;
2. the ``gpt2`` preset throughput benchmark with teacher prefetch and ``torch.compile`` each on and
   off (``ted_scale.cli.bench_throughput``);
3. the fused losses' memory and time benchmark at the ``gpt2`` preset (``ted_scale.cli.bench_losses``);
4. the Triton kernel report (registers, spills, shared memory, roofline; ``--kernel-report``).

A failing piece does not stop the others; the report (``<out>/report.md``, with the benchmarks'
JSON beside it) says which failed, and the exit status is non-zero if any did. Without a CUDA
device nothing runs: the command fails at once with ``NO_CUDA``.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ted_scale.io import atomic_write_text

NO_CUDA = "no CUDA device: nothing to check"


@dataclass(frozen=True)
class Piece:
    title: str
    command: list[str]


@dataclass(frozen=True)
class Outcome:
    piece: Piece
    returncode: int
    seconds: float
    output: str  # stdout and stderr, interleaved

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def pieces(out: Path, python: str = sys.executable) -> list[Piece]:
    """The checks, writing their JSON results under ``out``."""
    tests = [python, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests"]
    throughput = [
        python, "-m", "ted_scale.cli.bench_throughput", "--preset", "gpt2", "--prefetch", "on,off",
        "--compile", "on,off", "--out", str(out / "throughput-gpt2.json"),
    ]  # fmt: skip
    losses = [python, "-m", "ted_scale.cli.bench_losses", "--preset", "gpt2"]
    kernels = [python, "-m", "ted_scale.cli.bench_losses", "--kernel-report"]
    return [
        Piece("CUDA tests (pytest -m cuda)", tests),
        Piece("Throughput, gpt2 preset: prefetch on/off x compile on/off", throughput),
        Piece("Fused losses: peak memory and time, gpt2 preset",
              [*losses, "--out", str(out / "losses-gpt2.json")]),
        Piece("Triton kernels: registers, spills, shared memory, roofline",
              [*kernels, "--out", str(out / "kernels.json")]),
    ]  # fmt: skip


def run_piece(piece: Piece, cwd: Path, log: Callable[[str], None] = print) -> Outcome:
    """Runs one piece to completion, echoing its output as it comes."""
    log(f"== {piece.title}: {' '.join(piece.command)}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        piece.command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log(line.rstrip("\n"))
    returncode = proc.wait()
    return Outcome(piece, returncode, time.perf_counter() - start, "".join(lines))


def environment() -> dict[str, str]:
    """What the report was produced on: device, driver-side versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "CUDA": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def format_report(outcomes: list[Outcome], env: dict[str, str], started: datetime) -> str:
    """The Markdown report: environment, a summary table, then every piece's full output."""
    failed = [o for o in outcomes if not o.ok]
    verdict = f"FAILED ({len(failed)} of {len(outcomes)} pieces)" if failed else "all passed"
    lines = [
        "# GPU check",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC: **{verdict}**",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        "",
        "| check | result | time |",
        "|---|---|---|",
        *(
            f"| {o.piece.title} | {'pass' if o.ok else f'FAIL (exit {o.returncode})'} "
            f"| {o.seconds:.0f} s |"
            for o in outcomes
        ),
    ]
    for o in outcomes:
        lines += ["", f"## {o.piece.title}", "", f"`{' '.join(o.piece.command)}`", "", "```text",
                  o.output.rstrip("\n"), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_check(
    out: Path, *, cwd: Path = Path("."), checks: list[Piece] | None = None, log=print
) -> int:
    """Runs every piece (even after a failure), writes ``out/report.md``; 0 if all passed.

    Raises SystemExit(NO_CUDA) without a CUDA device, before running anything.
    """
    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    return write_check(out, checks or pieces(out), cwd=cwd, log=log)


def write_check(out: Path, checks: list[Piece], *, cwd: Path = Path("."), log=print) -> int:
    """``run_check`` without the CUDA requirement: run ``checks``, write the report."""
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    outcomes = [run_piece(piece, cwd, log) for piece in checks]
    report = out / "report.md"
    atomic_write_text(report, format_report(outcomes, environment(), started))
    log(f"report written to {report}")
    return 0 if all(o.ok for o in outcomes) else 1
