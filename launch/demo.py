"""The embedded default run (`make demo`): data, teacher, TED + KD + LWD, evaluation, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ted_scale.demo import run_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes")
    parser.add_argument("--ranks", type=int, default=2, help="CPU/GPU ranks per training run")
    args = parser.parse_args()
    run_demo(args.out, ranks=args.ranks)
