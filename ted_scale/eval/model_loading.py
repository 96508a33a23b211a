"""Load a model to evaluate, with its tokenizer, and check the tokenizer fits the model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ted_scale.data.tokenizer import load_tokenizer
from ted_scale.eval import EvalError
from ted_scale.model import GPT, load_pretrained

RUN_MODEL_DIR = "student_hf"  # where a run directory keeps its final student (an HF folder)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A run directory -> its `student_hf/`; an HF folder or hub name (e.g. `gpt2`) as is."""
    path = Path(name_or_path)
    if not path.exists():
        if path.is_absolute() or str(name_or_path).startswith("."):
            raise EvalError(f"model {str(name_or_path)!r}: no such directory")
        return str(name_or_path)  # a hub name
    if (path / "config.json").is_file():
        return str(path)
    if (path / RUN_MODEL_DIR / "config.json").is_file():
        return str(path / RUN_MODEL_DIR)
    if (path / "config.yaml").is_file():
        raise EvalError(f"run directory {path} has no {RUN_MODEL_DIR}/ (has training finished?)")
    raise EvalError(f"{path} is neither an HF model folder (config.json) nor a run directory")


def load_model(
    name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[GPT, PreTrainedTokenizerBase, str]:
    """Load (model in eval mode on `device`, its tokenizer, the resolved HF folder or hub name)."""
    source = resolve_model(name_or_path)
    try:
        model = load_pretrained(source)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load model {source!r}: {e}") from None
    tokenizer = load_tokenizer(source)
    return model.to(device).eval(), tokenizer, source


def check_ids(ids: Sequence[int], vocab_size: int, where: str) -> None:
    """Refuse token ids the model has no embedding for."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise EvalError(
            f"{where}: token id {bad[0]} is outside the model's vocabulary of {vocab_size} "
            "(the tokenizer does not belong to this model)"
        )


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str, *, vocab_size: int, where: str
) -> list[int]:
    """Token ids of `text` (no special tokens), checked to be usable by a `vocab_size` model.

    An empty encoding of non-empty text, or one made only of the unknown token, is an error: the
    tokenizer cannot represent the data and any score would be meaningless.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if text and (not ids or (unk is not None and set(ids) == {unk})):
        raise EvalError(f"{where}: the tokenizer cannot encode {text[:40]!r} (empty or unknown)")
    check_ids(ids, vocab_size, where)
    return ids
