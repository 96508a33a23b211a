"""`make demo`: a one-seed, shorter copy of the method study (teacher, the student alone, KD, LWD,
TED, CR-ILD, MiniDisc), evaluated and reported beside the study's mean ± std."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ted_scale.demo_pipeline import CONFIGS, STUDY_RESULTS, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes")
    parser.add_argument("--ranks", type=int, default=2, help="CPU/GPU ranks per training run")
    parser.add_argument(
        "--study",
        type=Path,
        default=STUDY_RESULTS,
        help="a study's results.json to put beside the demo's numbers (default: the committed one; "
        "runs/study/results.json after your own `make study`)",
    )
    args = parser.parse_args(argv)
    if not CONFIGS.is_dir():  # an installed package: the configs live in the repository
        print(
            f"demo: error: {CONFIGS} not found: the demo runs the configs/ of a ted_scale "
            "checkout; run `make demo` in a clone of the repository",
            file=sys.stderr,
        )
        return 2
    run_demo(args.out, ranks=args.ranks, study_results=args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
