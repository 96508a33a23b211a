"""Benchmark data preparation against the tokenizer's ceiling and the conventional HF route.

Rates, in text tokens/s on the same corpus and number of processes:
- prepare:      ted_scale.data.prepare (read, split, tokenise, pack, write shards + manifest);
- ceiling:      the Rust tokenizer's encode_batch_fast over in-memory documents in N processes;
- conventional: datasets.map(tokenize) + group_texts chunking, as transformers' run_clm.py.
Plus the loader's samples/s over one epoch. Offline by default: WikiText-2 repeated, and a
byte-level BPE trained on it. Method details: ted_scale/bench/data_prep.py.

    python launch/bench_data.py [--corpus FILE] [--tokenizer DIR] [--num-workers N] [--out F.json]
"""

import argparse
import os
import sys

from ted_scale.bench.data_prep import DEFAULT_REPEAT, DEFAULT_SEQ_LEN, DEFAULT_VOCAB, run_and_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", help="text corpus (default: WikiText-2 valid+test, --repeat times)")
    p.add_argument(
        "--repeat", type=int, default=DEFAULT_REPEAT,
        help=f"WikiText-2 copies when no --corpus is given (default: {DEFAULT_REPEAT})",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer",
        help=f"tokenizer folder (default: BPE of {DEFAULT_VOCAB} trained on the corpus)",
    )
    p.add_argument(
        "--num-workers", type=int, default=os.cpu_count(),
        help=f"processes for each route (default: one per CPU, {os.cpu_count()})",
    )  # fmt: skip
    p.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN,
        help=f"sequence length of the packed samples and of group_texts' blocks "
        f"(default: {DEFAULT_SEQ_LEN})",
    )  # fmt: skip
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    run_and_report(
        args.corpus, repeat=args.repeat, tokenizer=args.tokenizer,
        num_workers=args.num_workers, seq_len=args.seq_len, out=args.out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
