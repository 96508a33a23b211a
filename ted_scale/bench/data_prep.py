"""Data preparation speed against the tokenizer's ceiling and the conventional HF route.

Rates, in text tokens/s on the same corpus and with the same number of processes:
- ``prepare``: ``ted_scale.data.prepare`` end to end (read, split, tokenise, pack, write shards and
  the manifest); its token count leaves out the EOS appended to each document, so that all three
  rates count the same tokens;
- ``ceiling``: the Rust tokenizer's ``encode_batch_fast`` over the documents, already in memory,
  in N processes fed chunks of ``CHUNK_CHARS`` as ``prepare`` feeds its workers: no reading,
  splitting or writing, so no preparation with this tokenizer and this many processes can beat it;
- ``conventional``: ``datasets.map(tokenize)`` then ``group_texts`` chunking into ``seq_len``
  blocks, as transformers' ``run_clm.py`` does;
plus the loader's samples/s over one epoch of the prepared train split (batch 8, checksums off).

Each rate is one wall-clock measurement (``time.perf_counter``) of the whole call, process-pool
start-up included, as a user would pay it. Offline by default: WikiText-2 (valid + test, shipped
with the package) repeated ``repeat`` times, and a byte-level BPE of 8192 trained on it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from ted_scale.data.loader import DistributedBatchLoader, open_split
from ted_scale.data.prepare import CHUNK_CHARS, PrepareConfig, prepare
from ted_scale.data.sources import SourceSpec, SourceStats, iter_documents
from ted_scale.data.tokenizer import backend_path, load_tokenizer, train_bpe_tokenizer
from ted_scale.eval.datafiles import asset_text

DEFAULT_REPEAT = 4
DEFAULT_SEQ_LEN = 1024
DEFAULT_VOCAB = 8192  # the BPE trained on the corpus when no tokenizer is given
LOADER_BATCH = 8

T = TypeVar("T")

# The ceiling's per-process tokenizer. Set by `_init_ceiling_worker` in each pool process; the
# workers are module-level so that the pool can reach them by name.
_tok = None


def _init_ceiling_worker(path: str) -> None:
    global _tok
    from tokenizers import Tokenizer

    # Parallelism comes from the processes, as in `prepare`: no Rust threads on top.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tok = Tokenizer.from_file(path)


def _count_tokens(texts: list[str]) -> int:
    assert _tok is not None
    return sum(len(e) for e in _tok.encode_batch_fast(texts, add_special_tokens=False))


def ceiling(docs: list[str], tokenizer_dir: Path, n: int) -> int:
    """Tokens of ``docs`` encoded in ``n`` processes, in chunks of about ``CHUNK_CHARS``."""
    chunks, chunk, size = [], [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= CHUNK_CHARS:
            chunks.append(chunk)
            chunk, size = [], 0
    chunks.append(chunk)
    init_args = (str(backend_path(tokenizer_dir)),)
    with mp.get_context("fork").Pool(n, _init_ceiling_worker, init_args) as pool:
        return sum(pool.map(_count_tokens, chunks))


def conventional(docs: list[str], tokenizer_dir: Path, n: int, block: int) -> int:
    """Tokens after ``datasets.map`` tokenisation and ``run_clm.py``'s ``group_texts``."""
    import datasets  # optional dependency, needed only here

    tok = load_tokenizer(str(tokenizer_dir))

    def group_texts(examples: dict) -> dict:  # as in transformers' run_clm.py
        concat = {k: list(chain(*examples[k])) for k in examples}
        total = len(concat["input_ids"]) // block * block
        return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concat.items()}

    ds = datasets.Dataset.from_dict({"text": docs})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, num_proc=n, remove_columns=["text"])
    ds.map(group_texts, batched=True, num_proc=n)
    return sum(len(ids) for ids in ds["input_ids"])


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and its wall-clock seconds."""
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def run_benchmark(
    corpus: str | None = None,
    *,
    repeat: int = DEFAULT_REPEAT,
    tokenizer: str | None = None,
    num_workers: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> dict[str, int | float]:
    """Measure the three rates and the loader (see the module docstring); return the results.

    corpus: a text file (default: WikiText-2 valid + test, ``repeat`` times, in a temp folder).
    tokenizer: a tokenizer folder (default: a BPE of ``DEFAULT_VOCAB`` trained on the corpus).
    num_workers: processes for all three routes (default: one per CPU).
    """
    n = os.cpu_count() if num_workers is None else num_workers
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus_path = Path(corpus) if corpus else work / "corpus.txt"
    if not corpus:
        text = "".join(asset_text(f"wikitext-2-{f}.txt.gz") for f in ("valid", "test"))
        corpus_path.write_text(text * repeat, encoding="utf-8")
    docs = list(iter_documents(SourceSpec(str(corpus_path)), SourceStats()))
    tok_dir = Path(tokenizer) if tokenizer else work / "tokenizer"
    if not tokenizer:
        train_bpe_tokenizer(docs, DEFAULT_VOCAB).save_pretrained(str(tok_dir))

    cfg = PrepareConfig(input=str(corpus_path), out=str(work / "prepared"), tokenizer=str(tok_dir),
                        seq_len=seq_len, num_workers=n, verbose=False)  # fmt: skip
    m, t_prep = timed(prepare, cfg)
    prep_tokens = sum(s.num_tokens - s.num_documents for s in m.splits.values())  # minus EOS
    ceil_tokens, t_ceil = timed(ceiling, docs, tok_dir, n)
    conv_tokens, t_conv = timed(conventional, docs, tok_dir, n, seq_len)
    # Same tokens or the rates are not comparable.
    assert prep_tokens == ceil_tokens, (prep_tokens, ceil_tokens)

    loader = DistributedBatchLoader(open_split(cfg.out, verify_checksums="never"), LOADER_BATCH)
    t = time.perf_counter()
    samples = sum(len(x) for x, _ in loader)
    t_load = time.perf_counter() - t

    r: dict[str, int | float] = {
        "corpus_mb": corpus_path.stat().st_size / 2**20,
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
    return r


def format_results(r: dict[str, int | float]) -> str:
    """One ``name: value`` line per result, floats to two decimals."""
    return "\n".join(
        f"{k:>28}: {v:,.2f}" if isinstance(v, float) else f"{k:>28}: {v:,}" for k, v in r.items()
    )


def run_and_report(
    corpus: str | None = None,
    *,
    repeat: int = DEFAULT_REPEAT,
    tokenizer: str | None = None,
    num_workers: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    out: str | Path | None = None,
) -> dict[str, int | float]:
    """``run_benchmark``'s results, printed, and written as JSON to ``out`` when given."""
    r = run_benchmark(
        corpus, repeat=repeat, tokenizer=tokenizer, num_workers=num_workers, seq_len=seq_len
    )
    print(format_results(r))
    if out:
        Path(out).write_text(json.dumps(r, indent=2) + "\n")
    return r
