"""Data preparation: documents -> tokens (parallel workers) -> packed shards + manifest.

Streaming end to end: documents are read lazily, tokenised in bounded chunks by worker
processes with the Rust tokenizer's batch API, and written to fixed-size shards as they fill;
memory is one shard buffer per split plus the chunks in flight.

Owned files only: `.prepare.json` records the settings, the input and tokenizer fingerprints and
every file the preparation writes (before writing it). A re-run resumes only with equal settings
and fingerprints, deletes only recorded files, and refuses an `--out` holding anything else.

Resumable: a shard is complete once its file is renamed into place. A re-run with the same
settings keeps complete shards, re-reads the source (cheap: documents in finished shards are
hashed for their split but not tokenised), drops the already-written prefix of the one document
that straddles the last finished shard, and rewrites the rest; the result is byte-identical to
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ted_scale.data import DataError
from ted_scale.data.manifest import (
    DTYPES,
    SPLITS,
    Manifest,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
    load_manifest,
    manifest_path,
    num_samples,
    token_dtype,
    write_manifest,
)
from ted_scale.data.sources import (
    SourceSpec,
    SourceStats,
    fingerprint_change,
    input_fingerprint,
    iter_documents,
)
from ted_scale.data.tokenizer import (
    DEFAULT_TOKENIZER,
    backend_path,
    check_trained_vocab_size,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from ted_scale.io import (
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    links_leaving,
    replace_dir_leftovers,
)

STATE_NAME = ".prepare.json"  # the record of an unfinished run: see PrepareState
CHUNK_CHARS = 1 << 20  # text per worker task: large enough to amortise IPC
# Test hook: SIGKILL this process right after the N-th shard of this run is renamed into place.
KILL_AFTER_SHARDS_ENV = "TED_SCALE_PREPARE_KILL_AFTER_SHARDS"


@dataclass
class PrepareConfig:
    """Preparation settings; see launch/prepare_data.py --help for each one."""

    input: str
    out: str
    tokenizer: str = DEFAULT_TOKENIZER
    train_tokenizer: int | None = None  # vocab size of a BPE trained on the corpus instead
    seq_len: int = 1024
    test_fraction: float = 0.05
    text_field: str = "text"
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    shard_tokens: int = 1 << 26
    one_doc_per_line: bool = False
    skip_bad: bool = False
    hf_split: str = "train"
    hf_config: str | None = None
    streaming: bool = True
    verbose: bool = True

    def settings(self) -> dict[str, Any]:
        """The settings that determine the output bytes (not out, num_workers, verbose)."""
        d = dataclasses.asdict(self)
        for k in ("out", "num_workers", "verbose"):
            del d[k]
        return d

    def source(self) -> SourceSpec:
        return SourceSpec(
            input=self.input,
            text_field=self.text_field,
            one_doc_per_line=self.one_doc_per_line,
            skip_bad=self.skip_bad,
            hf_split=self.hf_split,
            hf_config=self.hf_config,
            streaming=self.streaming,
        )

    def validate(self) -> None:
        if self.seq_len < 1:
            raise DataError(f"--seq-len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise DataError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.shard_tokens < 1 or self.shard_tokens >= 2**32:
            raise DataError(f"--shard-tokens must be in [1, 2**32), got {self.shard_tokens}")
        if self.num_workers < 0:
            raise DataError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2**64:  # the 8-byte key of the split's hash
            raise DataError(f"--seed must be in [0, 2**64), got {self.seed}")
        if self.train_tokenizer is not None:
            check_trained_vocab_size(self.train_tokenizer)


def prepare(cfg: PrepareConfig) -> Manifest:
    """Prepare `cfg.input` into `cfg.out` (resuming an interrupted run) and return the manifest."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if links := links_leaving(out):
        listed = ", ".join(f"{p} -> {os.readlink(p)}" for p in links)
        raise DataError(
            f"{out} holds symbolic links to folders outside it ({listed}): prepare_data writes "
            "only inside --out, never through links; remove them (their targets stay as they "
            "are) or use another --out"
        )
    settings = cfg.settings()
    inputs = input_fingerprint(cfg.source())
    if manifest_path(out).exists():
        manifest = load_manifest(out)
        _check_same_settings(out / "manifest.json", manifest.settings, settings)
        if not manifest.inputs:
            _log(cfg, f"{out}: warning: the manifest records no input fingerprint, input unchecked")
        elif change := fingerprint_change(manifest.inputs, inputs):
            raise DataError(
                f"{out} was prepared from another version of the input ({change}); "
                "use another --out or delete it"
            )
        _log(cfg, f"{out}: already prepared with these settings and input, nothing to do")
        return manifest
    state = PrepareState.open(out, settings, inputs)

    tok_info = _prepare_tokenizer(cfg, out, state)
    dtype = token_dtype(tok_info.vocab_size)
    writers = {
        s: ShardWriter(out, s, np.dtype(DTYPES[dtype]), cfg.shard_tokens, state) for s in SPLITS
    }
    stats, doc_counts = _tokenize_and_write(cfg, out, tok_info, writers)

    splits = {}
    for s, w in writers.items():
        shards = w.finish()
        n = sum(sh.num_tokens for sh in shards)
        splits[s] = SplitInfo(doc_counts[s], n, num_samples(n, cfg.seq_len), shards)
    if splits["train"].num_samples == 0:
        raise DataError(
            f"train split has {splits['train'].num_tokens} tokens: fewer than one sample of "
            f"seq_len + 1 = {cfg.seq_len + 1}"
        )
    if cfg.test_fraction > 0 and splits["test"].num_samples == 0:
        raise DataError(
            f"test split has {splits['test'].num_tokens} tokens ({splits['test'].num_documents} "
            f"documents): fewer than one sample of seq_len + 1 = {cfg.seq_len + 1}; lower "
            "--seq-len, raise --test-fraction, or use --test-fraction 0 for no test split"
        )
    manifest = Manifest(
        seq_len=cfg.seq_len,
        dtype=dtype,
        shard_tokens=cfg.shard_tokens,
        tokenizer=tok_info,
        splits=splits,
        stats=dataclasses.asdict(stats),
        settings=settings,
        inputs=inputs,
    )
    write_manifest(out, manifest)
    state.path.unlink()
    _log(cfg, summary(manifest))
    return manifest


def summary(m: Manifest) -> str:
    """Closing summary: per-split counts and what was skipped or repaired in the input."""
    lines = [f"tokenizer {m.tokenizer.name} (vocab {m.tokenizer.vocab_size}), dtype {m.dtype}"]
    for name, s in m.splits.items():
        lines.append(
            f"{name:>5}: {s.num_documents:,} documents, {s.num_tokens:,} tokens, "
            f"{s.num_samples:,} samples of {m.seq_len}, {len(s.shards)} shards"
        )
    lines.append("input: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in m.stats.items()))
    return "\n".join(lines)


def _log(cfg: PrepareConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, file=sys.stderr)


def _check_same_settings(where: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise DataError(
            f"{where.parent} holds data prepared with other settings ({changes}); "
            "use another --out or delete it"
        )


def _is_test(text: str, seed: int, test_fraction: float) -> bool:
    """Deterministic split choice from the document's content: duplicates share a split."""
    if test_fraction == 0.0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < test_fraction * 2**64


def _prepare_tokenizer(cfg: PrepareConfig, out: Path, state: PrepareState) -> TokenizerInfo:
    """Load or train the tokenizer and save it to `out/tokenizer` (kept as is on resume)."""
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        tok = load_tokenizer(str(tok_dir))
        if cfg.train_tokenizer is None:
            wanted = tokenizer_fingerprint(load_tokenizer(cfg.tokenizer))
            if wanted != tokenizer_fingerprint(tok):
                raise DataError(f"{tok_dir} is not the tokenizer {cfg.tokenizer!r}")
        if state.data.get("tokenizer_sha256") not in (None, tokenizer_fingerprint(tok)):
            raise DataError(f"{tok_dir} is not the tokenizer this preparation started with")
    else:
        if cfg.train_tokenizer is None:
            tok = load_tokenizer(cfg.tokenizer)
        else:
            _log(cfg, f"training a byte-level BPE tokenizer of {cfg.train_tokenizer} tokens")
            train_docs = (
                d
                for d in iter_documents(cfg.source(), SourceStats())
                if not _is_test(d, cfg.seed, cfg.test_fraction)
            )
            tok = train_bpe_tokenizer(train_docs, cfg.train_tokenizer)
            if len(tok) < cfg.train_tokenizer:
                _log(
                    cfg,
                    f"warning: --train-tokenizer {cfg.train_tokenizer}: the corpus yields only "
                    f"{len(tok)} tokens; the tokenizer and manifest record {len(tok)}",
                )
        state.record("tokenizer")
        with atomic_replace_dir(tok_dir) as tmp:
            tok.save_pretrained(str(tmp))
    sha = tokenizer_fingerprint(tok)
    state.set_tokenizer(sha)
    name = cfg.tokenizer if cfg.train_tokenizer is None else f"bpe-{len(tok)}"
    return TokenizerInfo(name=name, vocab_size=len(tok), eos_id=tok.eos_token_id, sha256=sha)


class PrepareState:
    """`.prepare.json`: settings, input fingerprint (sources.input_fingerprint), tokenizer
    fingerprint and the files written so far, each recorded before it is written.

    Only recorded files (and the temporary names of their atomic writes) are ever deleted; an
    `--out` holding any other file is refused, naming it.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.out = path.parent
        self.data = data

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], inputs: dict[str, Any]) -> PrepareState:
        """Resume the record in `out` (same settings and input) or start one in a clean `out`."""
        path = out / STATE_NAME
        if path.exists():
            try:
                data = json.loads(path.read_text())
                old_settings, old_inputs = data["settings"], data["inputs"]
                assert isinstance(data["written"], list)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise DataError(
                    f"{path}: not a preparation record of this ted_scale version; "
                    f"delete {out} and prepare again"
                ) from None
            _check_same_settings(path, old_settings, settings)
            if change := fingerprint_change(old_inputs, inputs):
                raise DataError(
                    f"{out}: the input changed since this preparation was interrupted "
                    f"({change}); its shards cannot be reused: delete {out} or use another --out"
                )
        else:
            data = {"settings": settings, "inputs": inputs, "written": []}
        state = cls(path, data)
        foreign = state.foreign_files()
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise DataError(
                f"{out} holds files that ted_scale did not write: {', '.join(foreign[:5])}{more}; "
                "use an empty or new --out (nothing was deleted)"
            )
        if not path.exists():
            state.save()
        return state

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def record(self, rel: str) -> None:
        """Note `rel` (relative to out) as this preparation's own, before writing it."""
        if rel not in self.data["written"]:
            self.data["written"].append(rel)
            self.save()

    def set_tokenizer(self, sha256: str) -> None:
        if self.data.get("tokenizer_sha256") != sha256:
            self.data["tokenizer_sha256"] = sha256
            self.save()

    def owns(self, rel: str) -> bool:
        """Whether `rel` is a recorded file, inside a recorded directory, or a temporary name of
        one (atomic_write_bytes: `.NAME.*.tmp`; atomic_replace_dir: its leftovers)."""
        written = set(self.data["written"])
        parts = Path(rel).parts
        if rel in written or parts[0] in written:
            return True
        for name in written:
            leftovers = {p.name for p in replace_dir_leftovers(self.out / name)}
            if parts[0] in leftovers:
                return True
        parent, base = str(Path(rel).parent), Path(rel).name
        if base.startswith(".") and base.endswith(".tmp"):
            original = base[1:].rsplit(".", 2)[0]
            return str(Path(parent) / original).removeprefix("./") in written | {STATE_NAME}
        return False

    def foreign_files(self) -> list[str]:
        """Files under out that this preparation did not write, sorted."""
        files = (p.relative_to(self.out) for p in self.out.rglob("*") if not p.is_dir())
        return sorted(str(p) for p in files if str(p) != STATE_NAME and not self.owns(str(p)))


class ChunkEncoder:
    """Tokenises a chunk of documents into per-split token streams (each doc + EOS)."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: np.dtype):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.eos_id = eos_id
        self.dtype = dtype

    def __call__(
        self, texts: list[str], is_test: list[bool]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Returns [(tokens [n], doc_lengths [d]) for train, for test]; lengths include EOS."""
        encs = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        out = []
        for want in (False, True):
            flat: list[int] = []
            lengths = []
            for enc, t in zip(encs, is_test, strict=True):
                if t is want:
                    flat.extend(enc.ids)
                    flat.append(self.eos_id)
                    lengths.append(len(enc.ids) + 1)
            out.append((np.array(flat, dtype=self.dtype), np.array(lengths, dtype=np.int64)))
        return out


_worker_encoder: ChunkEncoder | None = None


def _init_worker(tokenizer_json: str, eos_id: int, dtype: np.dtype) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _worker_encoder = ChunkEncoder(tokenizer_json, eos_id, dtype)


def _encode_in_worker(texts: list[str], is_test: list[bool]) -> list[tuple[np.ndarray, np.ndarray]]:
    assert _worker_encoder is not None
    return _worker_encoder(texts, is_test)


def _tokenize_and_write(
    cfg: PrepareConfig, out: Path, tok: TokenizerInfo, writers: dict[str, ShardWriter]
) -> tuple[SourceStats, dict[str, int]]:
    """Stream the source through the tokenizer into the writers; returns input stats and the
    number of documents of each split."""
    stats = SourceStats()
    doc_counts = dict.fromkeys(SPLITS, 0)
    skip = {s: w.resume_skip_docs for s, w in writers.items()}
    drop = {s: w.resume_drop_tokens for s, w in writers.items()}
    init_args = (str(backend_path(out / "tokenizer")), tok.eos_id, writers["train"].dtype)
    bar = tqdm(unit="doc", unit_scale=True, disable=not cfg.verbose, desc="tokenizing")
    start, num_tokens = time.perf_counter(), 0

    def write(result: list[tuple[np.ndarray, np.ndarray]]) -> None:
        nonlocal num_tokens
        for s, (tokens, lengths) in zip(SPLITS, result, strict=True):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
            if drop[s]:  # the resumed document's prefix already lies in a finished shard
                d = min(drop[s], len(tokens))
                tokens, starts, drop[s] = tokens[d:], starts[starts >= d] - d, drop[s] - d
            writers[s].append(tokens, starts)
            num_tokens += len(tokens)
            bar.update(len(lengths))
        bar.set_postfix_str(f"{num_tokens / (time.perf_counter() - start):,.0f} tok/s")

    def chunks() -> Iterator[tuple[list[str], list[bool]]]:
        texts: list[str] = []
        flags: list[bool] = []
        size = 0
        for text in iter_documents(cfg.source(), stats):
            t = _is_test(text, cfg.seed, cfg.test_fraction)
            s = SPLITS[t]
            doc_counts[s] += 1
            if doc_counts[s] <= skip[s]:
                continue  # wholly inside a finished shard
            texts.append(text)
            flags.append(t)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield texts, flags
                texts, flags, size = [], [], 0
        if texts:
            yield texts, flags

    if cfg.num_workers == 0:
        encoder = ChunkEncoder(*init_args)
        for texts, flags in chunks():
            write(encoder(texts, flags))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(cfg.num_workers, _init_worker, init_args) as pool:
            # Bounded in flight (Pool.imap would read the whole source ahead); in-order results.
            pending: deque = deque()
            for texts, flags in chunks():
                pending.append(pool.apply_async(_encode_in_worker, (texts, flags)))
                if len(pending) >= 2 * cfg.num_workers:
                    write(pending.popleft().get())
            while pending:
                write(pending.popleft().get())
    bar.close()
    return stats, doc_counts


class ShardWriter:
    """Packs one split's token stream into `{split}/shard_NNNNN.bin` files of `shard_tokens`.

    On construction, finds the complete shards of an interrupted run (full-size shard files, in
    order), keeps them, removes everything after them, and sets `resume_skip_docs` (documents of
    this split wholly inside them) and `resume_drop_tokens` (tokens of the next document that
    they already hold).
    """

    def __init__(
        self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, state: PrepareState
    ):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.state = state
        self.dir = out / split
        self.dir.mkdir(exist_ok=True)
        self.shards: list[ShardInfo] = []
        last_start, starts_seen = 0, 0
        while (info := self._complete_shard(len(self.shards))) is not None:
            starts = np.fromfile(self.out / info.doc_starts, dtype=np.uint32)
            if len(starts):
                last_start = len(self.shards) * shard_tokens + int(starts[-1])
                starts_seen += len(starts)
            self.shards.append(info)
        kept = {Path(p).name for sh in self.shards for p in (sh.path, sh.doc_starts)}
        for stale in self.dir.iterdir():
            rel = f"{split}/{stale.name}"
            if stale.name not in kept and state.owns(rel):  # partial shards, temporary files
                stale.unlink()
        self.resume_skip_docs = max(0, starts_seen - 1)
        self.resume_drop_tokens = len(self.shards) * shard_tokens - last_start
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.starts: list[np.ndarray] = []

    def _names(self, index: int) -> tuple[str, str]:
        stem = f"{self.split}/shard_{index:05d}"
        return f"{stem}.bin", f"{stem}.docs.bin"

    def _complete_shard(self, index: int) -> ShardInfo | None:
        path, docs = self._names(index)
        try:
            size = (self.out / path).stat().st_size
        except FileNotFoundError:
            return None
        if size != self.shard_tokens * self.dtype.itemsize or not (self.out / docs).exists():
            return None
        n_starts = (self.out / docs).stat().st_size // 4
        return ShardInfo(path, self.shard_tokens, file_sha256(self.out / path), docs, n_starts)

    def append(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """Append tokens [n] whose documents begin at offsets `doc_starts` [d] (ascending)."""
        pos = 0
        while pos < len(tokens):
            n = min(len(tokens) - pos, self.shard_tokens - self.fill)
            self.buffer[self.fill : self.fill + n] = tokens[pos : pos + n]
            lo, hi = np.searchsorted(doc_starts, [pos, pos + n])
            self.starts.append(doc_starts[lo:hi] - pos + self.fill)
            self.fill += n
            pos += n
            if self.fill == self.shard_tokens:
                self._flush()

    def finish(self) -> list[ShardInfo]:
        """Write the last (partial) shard; returns all shards of the split in order."""
        if self.fill:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        path, docs = self._names(len(self.shards))
        data = self.buffer[: self.fill]
        starts = (
            np.concatenate(self.starts).astype(np.uint32) if self.starts else np.empty(0, np.uint32)
        )
        self.state.record(docs)
        self.state.record(path)
        # Doc starts first: a shard file in place implies its doc-start file is complete.
        atomic_write_bytes(self.out / docs, starts.tobytes())
        atomic_write_bytes(self.out / path, data.tobytes())
        sha = hashlib.sha256(data.tobytes()).hexdigest()
        self.shards.append(ShardInfo(path, int(self.fill), sha, docs, len(starts)))
        self.fill, self.starts = 0, []
        _fault_hook()


_shards_written = 0


def _fault_hook() -> None:
    global _shards_written
    _shards_written += 1
    if os.environ.get(KILL_AFTER_SHARDS_ENV) == str(_shards_written):
        os.kill(os.getpid(), signal.SIGKILL)
