"""Evaluate a model (HF folder, hub name or run directory) on LAMBADA, WikiText and held-out data.

    python launch/evaluate.py --model runs/ted --tasks lambada,wikitext,heldout --data data/owt \
        --out results/ted.json
"""

from __future__ import annotations

import argparse
import sys

from ted_scale.data import DataError
from ted_scale.eval import EvalError
from ted_scale.eval.run_tasks import SOURCES, format_summary, run_evaluation
from ted_scale.eval.wikitext import PROTOCOLS
from ted_scale.eval.wikitext import SOURCES as WIKITEXT_SOURCES
from ted_scale.io import atomic_write_json, os_error_message


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, hub name (gpt2) or run directory")
    p.add_argument("--tasks", default="lambada,wikitext,heldout", help="comma-separated tasks")
    p.add_argument("--data", help="prepared data directory (for heldout: its test split)")
    p.add_argument("--out", required=True, help="results JSON file (written atomically)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--wikitext-protocol",
        choices=PROTOCOLS,
        default="lm-eval",
        help="lm-eval: per article, disjoint windows, as lm-evaluation-harness (comparable with "
        "published numbers); stream: one stream, overlapping windows (see --stride)",
    )
    p.add_argument("--stride", type=int, help="stream protocol's window step (default: half)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-detokenize", action="store_true", help="score WikiText as released")
    p.add_argument("--lambada-source", choices=SOURCES, default="bundled")
    p.add_argument(
        "--wikitext-source",
        choices=WIKITEXT_SOURCES,
        default="auto",
        help="hf: the raw release (wikitext-2-raw-v1); bundled: the tokenised release shipped "
        "with ted_scale (wikitext-2-v1); auto: hf when the HF hub answers, else bundled",
    )
    p.add_argument("--max-examples", type=int, help="cap passages / articles / batches")
    args = p.parse_args(argv)
    for option, value in (
        ("--batch-size", args.batch_size),
        ("--stride", args.stride),
        ("--max-examples", args.max_examples),
    ):
        if value is not None and value < 1:
            p.error(f"{option} must be >= 1, got {value}")
    try:
        results = run_evaluation(
            args.model,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            data_dir=args.data,
            batch_size=args.batch_size,
            stride=args.stride,
            device=args.device,
            detokenize=not args.no_detokenize,
            lambada_source=args.lambada_source,
            wikitext_source=args.wikitext_source,
            wikitext_protocol=args.wikitext_protocol,
            max_examples=args.max_examples,
        )
        atomic_write_json(args.out, results)
    except (EvalError, DataError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full or read-only disk, a file in the way: path and errno's meaning
        print(f"evaluate: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    print(format_summary(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
