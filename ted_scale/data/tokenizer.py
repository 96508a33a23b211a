"""Tokenizers: an HF tokenizer by name or path, or a byte-level BPE trained on the corpus."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ted_scale.data import DataError

EOS_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER = "gpt2"
# The classes that load ``tokenizer.json`` as it is (transformers 5's name, and 4's).
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a fast HF tokenizer (hub name or local folder); it must define an EOS token.

    A local folder must hold a complete ``tokenizer.json``: a missing or truncated one is named,
    never replaced by a tokenizer rebuilt from whatever else the folder holds. A folder whose
    ``tokenizer_config.json`` names no class of its own (what ``save_pretrained`` of a tokenizer
    trained here, or of ``tokenizer.json`` alone, writes) loads exactly that file, whatever model
    its ``config.json`` describes: AutoTokenizer would pick the class by the model type, and
    Qwen2's rebuilds the normalizer and pre-tokenizer over the file's."""
    loader = AutoTokenizer
    if Path(name_or_path).is_dir():
        spec = backend_path(name_or_path)
        try:
            json.loads(spec.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{spec}: missing (a tokenizer folder needs it)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{spec}: truncated or not JSON ({e})") from None
        if _declared_class(Path(name_or_path)) in _GENERIC_CLASSES:
            loader = PreTrainedTokenizerFast
    try:
        tok = loader.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {e}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {name_or_path!r} has no fast (Rust) version")
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} defines no EOS token")
    if len(tok) < 2:
        raise DataError(f"tokenizer {name_or_path!r} is empty ({len(tok)} tokens)")
    return tok


def _declared_class(folder: Path) -> str | None:
    """The tokenizer class a folder's ``tokenizer_config.json`` names, if it names one."""
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # absent or unreadable: AutoTokenizer decides
        return None


# The largest vocabulary a BPE is trained to: 4x the largest vocabularies in use (~256k); far
# larger sizes make the Rust trainer panic (capacity overflow) instead of answering.
MAX_TRAINED_VOCAB = 2**20


def check_trained_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE size outside [256 byte tokens + EOS, :data:`MAX_TRAINED_VOCAB`], by option."""
    least = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if not least <= vocab_size <= MAX_TRAINED_VOCAB:
        raise DataError(
            f"--train-tokenizer must be in [{least}, {MAX_TRAINED_VOCAB}] (the 256 byte tokens "
            f"and EOS at least), got {vocab_size}"
        )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on streamed `texts`; `<|endoftext|>` is its EOS.

    `vocab_size` counts the 256 byte tokens and EOS. Training is deterministic for equal input.
    """
    check_trained_vocab_size(vocab_size)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(_batched(texts, 1000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast | Tokenizer) -> str:
    """sha256 of what maps text to ids: model (vocab, merges), normalizer, pre-tokenizer, added
    tokens. Runtime settings (padding, truncation) and the file's version field are left out."""
    backend = tok.backend_tokenizer if isinstance(tok, PreTrainedTokenizerFast) else tok
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    # Merges are stored as "a b" strings or as [a, b] pairs depending on the library version.
    if "merges" in model:
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    canon = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode("utf-8")).hexdigest()


def backend_path(tokenizer_dir: str | Path) -> Path:
    """The `tokenizer.json` (Rust tokenizer) inside a saved HF tokenizer folder."""
    return Path(tokenizer_dir) / "tokenizer.json"
