"""Benchmark data preparation against the tokenizer's ceiling and the conventional HF route.

Rates, in text tokens/s on the same corpus and number of processes:
- prepare:      ted_scale.data.prepare (read, split, tokenise, pack, write shards + manifest);
- ceiling:      the Rust tokenizer's encode_batch_fast over in-memory documents in N processes;
- conventional: datasets.map(tokenize) + group_texts chunking, as transformers' run_clm.py.
Plus the loader's samples/s over one epoch. Offline by default: WikiText-2 repeated, and a
byte-level BPE trained on it.

    python launch/bench_data.py [--corpus FILE] [--tokenizer DIR] [--num-workers N] [--out F.json]
"""

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from itertools import chain
from pathlib import Path

from ted_scale.data.loader import DistributedBatchLoader, open_split
from ted_scale.data.prepare import CHUNK_CHARS, PrepareConfig, prepare
from ted_scale.data.sources import SourceSpec, SourceStats, iter_documents
from ted_scale.data.tokenizer import backend_path, load_tokenizer, train_bpe_tokenizer
from ted_scale.eval.datafiles import asset_text

_tok = None


def _init(path: str) -> None:
    global _tok
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tok = Tokenizer.from_file(path)


def _count(texts: list[str]) -> int:
    return sum(len(e) for e in _tok.encode_batch_fast(texts, add_special_tokens=False))


def ceiling(docs: list[str], tokenizer_dir: Path, n: int) -> int:
    chunks, chunk, size = [], [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= CHUNK_CHARS:
            chunks.append(chunk)
            chunk, size = [], 0
    chunks.append(chunk)
    with mp.get_context("fork").Pool(n, _init, (str(backend_path(tokenizer_dir)),)) as pool:
        return sum(pool.map(_count, chunks))


def conventional(docs: list[str], tokenizer_dir: Path, n: int, block: int) -> int:
    import datasets

    tok = load_tokenizer(str(tokenizer_dir))

    def group_texts(examples: dict) -> dict:  # as in transformers' run_clm.py
        concat = {k: list(chain(*examples[k])) for k in examples}
        total = len(concat["input_ids"]) // block * block
        return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concat.items()}

    ds = datasets.Dataset.from_dict({"text": docs})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=n, remove_columns=["text"])
    ds.map(group_texts, batched=True, num_proc=n)
    return sum(len(ids) for ids in ds["input_ids"])


def timed(fn, *args) -> tuple[int, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", help="text corpus (default: WikiText-2 valid+test, --repeat times)")
    p.add_argument("--repeat", type=int, default=4, help="WikiText-2 copies (default: 4)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: BPE of 8192 trained on corpus)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count(), help="processes")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = Path(args.corpus) if args.corpus else work / "corpus.txt"
    if not args.corpus:
        text = "".join(asset_text(f"wikitext-2-{f}.txt.gz") for f in ("valid", "test"))
        corpus.write_text(text * args.repeat, encoding="utf-8")
    docs = list(iter_documents(SourceSpec(str(corpus)), SourceStats()))
    tok_dir = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if not args.tokenizer:
        train_bpe_tokenizer(docs, 8192).save_pretrained(str(tok_dir))

    n = args.num_workers
    cfg = PrepareConfig(input=str(corpus), out=str(work / "prepared"), tokenizer=str(tok_dir),
                        seq_len=args.seq_len, num_workers=n, verbose=False)  # fmt: skip
    m, t_prep = timed(prepare, cfg)
    prep_tokens = sum(s.num_tokens - s.num_documents for s in m.splits.values())  # minus EOS
    ceil_tokens, t_ceil = timed(ceiling, docs, tok_dir, n)
    conv_tokens, t_conv = timed(conventional, docs, tok_dir, n, args.seq_len)
    assert prep_tokens == ceil_tokens, (prep_tokens, ceil_tokens)

    loader = DistributedBatchLoader(open_split(cfg.out, verify_checksums="never"), 8)
    t = time.perf_counter()
    samples = sum(len(x) for x, _ in loader)
    t_load = time.perf_counter() - t

    r = {
        "corpus_mb": corpus.stat().st_size / 2**20,
        "documents": len(docs),
        "tokens": prep_tokens,
        "num_workers": n,
        "prepare_tokens_per_s": prep_tokens / t_prep,
        "ceiling_tokens_per_s": ceil_tokens / t_ceil,
        "conventional_tokens_per_s": conv_tokens / t_conv,
        "loader_samples_per_s": samples / t_load,
    }
    r["prepare_vs_ceiling"] = r["prepare_tokens_per_s"] / r["ceiling_tokens_per_s"]
    r["prepare_vs_conventional"] = r["prepare_tokens_per_s"] / r["conventional_tokens_per_s"]
    for k, v in r.items():
        print(f"{k:>28}: {v:,.2f}" if isinstance(v, float) else f"{k:>28}: {v:,}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
