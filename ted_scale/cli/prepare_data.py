"""Tokenise a corpus into packed, sharded token files for training (see ted_scale.data.prepare).

python launch/prepare_data.py --input openwebtext --out data/owt
python launch/prepare_data.py --input 'corpus/*.jsonl' --out data/c --train-tokenizer 8192
"""

from __future__ import annotations

import argparse
import sys

from ted_scale.data import DataError
from ted_scale.data.prepare import PrepareConfig, prepare
from ted_scale.io import os_error_message


def main(argv: list[str] | None = None) -> int:
    d = PrepareConfig(input="", out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--input",
        required=True,
        help="HF dataset name (e.g. openwebtext), or local .txt/.jsonl/.parquet files:\n"
        "a file, a directory (searched recursively) or a quoted glob",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory: manifest.json, tokenizer/, train/ and test/ shards;\n"
        "re-running on an interrupted DIR resumes it (a DIR holding files it did not\n"
        "write, or an input changed since, is refused, naming them)",
    )
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        help="HF tokenizer name or local folder (default: %(default)s)",
    )
    tok.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="instead train a byte-level BPE of VOCAB tokens on the train documents",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help="tokens per sample; samples are windows of seq-len + 1 (default: %(default)s)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=d.test_fraction,
        help="fraction of documents held out to the test split (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the deterministic train/test choice (default: %(default)s)",
    )
    p.add_argument(
        "--text-field",
        default=d.text_field,
        help="text field of .jsonl/.parquet/HF records (default: %(default)s)",
    )
    p.add_argument(
        "--one-doc-per-line",
        action="store_true",
        help=".txt: one document per line (default: documents separated by blank lines)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count .jsonl lines that are not JSON or lack the text field\n"
        "(default: stop with file:line and the reason)",
    )
    p.add_argument(
        "--split",
        default=d.hf_split,
        dest="hf_split",
        help="HF dataset split to read (default: %(default)s)",
    )
    p.add_argument(
        "--hf-config", default=None, help="HF dataset configuration name, if it has several"
    )
    p.add_argument(
        "--no-streaming",
        dest="streaming",
        action="store_false",
        help="HF datasets: download and cache the dataset instead of streaming it",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=d.shard_tokens,
        help="tokens per shard file (default: %(default)s)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help="tokenizer processes; 0 tokenises in this process (default: CPU count, %(default)s)",
    )
    p.add_argument(
        "--quiet", dest="verbose", action="store_false", help="no progress bar or summary"
    )

    try:
        prepare(PrepareConfig(**vars(p.parse_args(argv))))
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full or read-only disk, a file in the way: path and errno's meaning
        print(f"prepare_data: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
