"""Every GPU-only check in one command, into one Markdown report (``make gpu-check``).

    python launch/gpu_check.py [--out runs/gpu-check]

Runs the cuda-marked tests, the gpt2 preset throughput benchmark (teacher prefetch on/off x
torch.compile on/off), the fused losses benchmark at the gpt2 preset and the Triton kernel report,
then writes OUT/report.md (benchmark JSON beside it). Exit status 1 if any check failed. Without a
CUDA device it fails at once with "no CUDA device: nothing to check". Details:
ted_scale/bench/gpu_report.py.
"""

import argparse
import sys
from pathlib import Path

from ted_scale.bench.gpu_report import run_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/gpu-check"),
        help="directory for report.md and the benchmarks' JSON (default: runs/gpu-check)",
    )  # fmt: skip
    return run_check(parser.parse_args(argv).out)


if __name__ == "__main__":
    sys.exit(main())
