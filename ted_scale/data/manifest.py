"""The prepared-data format: `DIR/manifest.json` describing packed token shards.

Layout of a data directory (all paths in the manifest are relative to it):

    manifest.json
    tokenizer/                     HF tokenizer files
    {split}/shard_00000.bin        tokens, `dtype`, a fixed `shard_tokens` per shard (last shorter)
    {split}/shard_00000.docs.bin   uint32 offsets (within the shard) where documents start

Each split is one token stream: every document followed by EOS, documents concatenated, cut
into shards. Sample i of a split is tokens[i * seq_len : i * seq_len + seq_len + 1].
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ted_scale.data import DataError
from ted_scale.io import atomic_write_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int) -> str:
    """Smallest shard dtype that holds every token id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def num_samples(num_tokens: int, seq_len: int) -> int:
    """Number of (seq_len + 1)-token windows at stride seq_len in a stream of `num_tokens`."""
    return max(0, (num_tokens - 1) // seq_len)


@dataclass
class ShardInfo:
    path: str  # token file, relative to the data directory
    num_tokens: int
    sha256: str
    doc_starts: str  # uint32 offsets of document starts within this shard
    num_doc_starts: int


@dataclass
class SplitInfo:
    num_documents: int
    num_tokens: int
    num_samples: int
    shards: list[ShardInfo]


@dataclass
class TokenizerInfo:
    name: str
    vocab_size: int
    eos_id: int
    sha256: str  # ted_scale.data.tokenizer.tokenizer_fingerprint
    path: str = "tokenizer"


@dataclass
class Manifest:
    seq_len: int
    dtype: str
    shard_tokens: int
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    # Input accounting: documents read, empty docs skipped, invalid UTF-8 replaced, bad records.
    stats: dict[str, int] = field(default_factory=dict)
    # The preparation settings that determine the bytes (used to resume or refuse a mismatch).
    settings: dict[str, Any] = field(default_factory=dict)
    # ted_scale.data.sources.input_fingerprint of the input it was prepared from.
    inputs: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        """Build a manifest from parsed JSON, raising DataError on any missing or bad key."""
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {version!r} is not supported (this code reads "
                f"{FORMAT_VERSION}); re-run launch/prepare_data.py"
            )
        try:
            splits = {
                name: SplitInfo(
                    **{k: v for k, v in s.items() if k != "shards"},
                    shards=[ShardInfo(**sh) for sh in s["shards"]],
                )
                for name, s in d["splits"].items()
            }
            m = cls(
                seq_len=int(d["seq_len"]),
                dtype=d["dtype"],
                shard_tokens=int(d["shard_tokens"]),
                tokenizer=TokenizerInfo(**d["tokenizer"]),
                splits=splits,
                stats=dict(d.get("stats", {})),
                settings=dict(d.get("settings", {})),
                inputs=dict(d.get("inputs", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if m.dtype not in DTYPES:
            raise DataError(f"{where}: unknown dtype {m.dtype!r}")
        if m.settings.get("seq_len", m.seq_len) != m.seq_len:
            raise DataError(
                f"{where}: seq_len {m.seq_len} disagrees with the seq_len "
                f"{m.settings['seq_len']} the shards were prepared with"
            )
        for name, s in m.splits.items():
            if sum(sh.num_tokens for sh in s.shards) != s.num_tokens:
                raise DataError(f"{where}: split {name!r} shard sizes do not add up to num_tokens")
            if s.num_samples != num_samples(s.num_tokens, m.seq_len):
                raise DataError(
                    f"{where}: seq_len {m.seq_len} disagrees with split {name!r}: its "
                    f"{s.num_tokens} tokens make {num_samples(s.num_tokens, m.seq_len)} samples "
                    f"of {m.seq_len}, the manifest says {s.num_samples}"
                )
        return m


def manifest_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and validate `data_dir/manifest.json`."""
    path = manifest_path(data_dir)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (prepare data with launch/prepare_data.py)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    return Manifest.from_dict(d, where=str(path))


def write_manifest(data_dir: str | Path, manifest: Manifest) -> None:
    """Atomically write `data_dir/manifest.json` (deterministic bytes for equal manifests)."""
    atomic_write_json(manifest_path(data_dir), manifest.to_dict())
