"""Table 1 of the paper from evaluate.py results files, as Markdown.

    python launch/report.py --results teacher=r/gpt2.json KD=r/kd.json LWD=r/lwd.json TED=r/ted.json \
        [--transfer KD=r/kd_ft.json ...] [--study docs/study/results.json] --out table.md
"""

from __future__ import annotations

import argparse
import sys

from ted_scale.eval import EvalError
from ted_scale.eval.table1 import load_results, load_study, parse_named, table1
from ted_scale.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, metavar="NAME=FILE", help="zero-shot")
    p.add_argument("--transfer", nargs="*", default=[], metavar="NAME=FILE", help="after transfer")
    p.add_argument(
        "--study",
        metavar="FILE",
        help="a study's results.json (`make study`): its mean ± std beside each zero-shot column; "
        "when FILE is absent the table says so instead",
    )
    p.add_argument(
        "--study-rows",
        nargs="*",
        default=[],
        metavar="NAME=ROW",
        help="the study row of a table name (default: the name lower-cased, e.g. CR-ILD -> cr_ild)",
    )
    p.add_argument("--note", action="append", default=[], help="a line under the table")
    p.add_argument("--out", required=True, help="Markdown file to write")
    args = p.parse_args(argv)
    try:
        zero_shot = {n: load_results(f) for n, f in parse_named(args.results, "--results").items()}
        transfer = {n: load_results(f) for n, f in parse_named(args.transfer, "--transfer").items()}
        table = table1(
            zero_shot,
            transfer,
            study=load_study(args.study) if args.study else None,
            study_source=args.study,
            study_rows=parse_named(args.study_rows, "--study-rows"),
            notes=args.note,
        )
        atomic_write_text(args.out, table)
    except (EvalError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
