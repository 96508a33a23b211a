"""Figure 2 of the paper (training loss, per-layer distillation loss vs step) from run directories.

python launch/plot_metrics.py --runs LWD=runs/lwd TED=runs/ted --out figures/
"""

from __future__ import annotations

import argparse
import sys

from ted_scale.eval import EvalError
from ted_scale.eval.plots import plot_runs
from ted_scale.eval.table1 import parse_named


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    args = p.parse_args(argv)
    try:
        written = plot_runs(parse_named(args.runs, "--runs"), args.out)
    except (EvalError, OSError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
