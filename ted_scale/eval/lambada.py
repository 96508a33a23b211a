"""LAMBADA (OpenAI's test file, 5,153 passages): last-word accuracy and perplexity.

As in lm-evaluation-harness `lambada_openai`: the context is the passage without its last word,
the target is a space plus that word. A passage counts as correct when every target token is the
model's greedy prediction; perplexity is exp of the mean over passages of the target's summed
NLL. Contexts longer than the model's window lose tokens on the left.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import PreTrainedTokenizerBase

from ted_scale.eval import EvalError
from ted_scale.eval.datafiles import asset, read_lines
from ted_scale.eval.model_loading import encode
from ted_scale.eval.scoring import IGNORE_INDEX, model_device, perplexity, score_sequences
from ted_scale.model import GPT

BUNDLED = "lambada_openai_test.jsonl.gz"
HF_DATASET = ("EleutherAI/lambada_openai", "default")


def load_lambada(path: str | os.PathLike | None = None) -> list[str]:
    """Passages from a JSON-lines file of `{"text": ...}` objects (`.gz` allowed).

    path: None reads the bundled copy of the OpenAI test file. Errors name the file and line.
    """
    path = asset(BUNDLED) if path is None else path
    passages = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(
                f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})"
            ) from None
        if not isinstance(text, str) or " " not in text.strip():
            raise EvalError(f"{path}:{lineno}: 'text' must be a passage of several words")
        passages.append(text)
    if not passages:
        raise EvalError(f"{path}: no passages")
    return passages


def load_lambada_hf() -> list[str]:
    """Passages of the HF dataset `EleutherAI/lambada_openai` (needs the hub or its cache)."""
    from datasets import load_dataset  # heavy import, only for this path

    try:
        return list(load_dataset(*HF_DATASET, split="test")["text"])
    except Exception as e:  # the hub raises many types (connection, missing config, ...)
        raise EvalError(f"cannot load {HF_DATASET[0]}: {e}") from None


def split_passage(text: str) -> tuple[str, str]:
    """Passage -> (context, target): the target is the last space-separated word with its space."""
    context, _, last = text.rpartition(" ")
    return context, " " + last


def lambada_example(
    tokenizer: PreTrainedTokenizerBase, text: str, *, window: int, vocab_size: int, where: str
) -> tuple[list[int], list[int]]:
    """One passage -> (inputs, targets) for `score_sequences`, at most `window` tokens long."""
    context, target = split_passage(text)
    # An empty context is conditioned on EOS, as the harness does.
    ctx = encode(tokenizer, context, vocab_size=vocab_size, where=where) or [tokenizer.eos_token_id]
    tgt = encode(tokenizer, target, vocab_size=vocab_size, where=where)
    if not 0 < len(tgt) <= window:
        raise EvalError(f"{where}: target {target!r} is {len(tgt)} tokens (window {window})")
    ids = (ctx + tgt)[-(window + 1) :]  # left-truncate to fit the window
    inputs = ids[:-1]
    return inputs, [IGNORE_INDEX] * (len(inputs) - len(tgt)) + tgt


def evaluate_lambada(
    model: GPT,
    tokenizer: PreTrainedTokenizerBase,
    passages: list[str],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    max_examples: int | None = None,
    fused: bool = True,
    progress: bool = False,
) -> dict:
    """LAMBADA accuracy and perplexity of `model` on `passages` (the first `max_examples`).

    Returns {"accuracy", "perplexity", "num_examples"}. Deterministic: eval mode, fixed order.
    """
    passages = passages[:max_examples] if max_examples is not None else passages
    if not passages:
        raise EvalError("LAMBADA: no passages to evaluate")
    cfg = model.config
    examples = [
        lambada_example(
            tokenizer,
            text,
            window=cfg.n_positions,
            vocab_size=cfg.vocab_size,
            where=f"LAMBADA passage {i + 1}",
        )
        for i, text in enumerate(passages)
    ]
    scores = score_sequences(
        model,
        examples,
        batch_size=batch_size,
        device=torch.device(device) if device is not None else model_device(model),
        fused=fused,
        desc="lambada",
        progress=progress,
    )
    return {
        "accuracy": sum(s.all_correct for s in scores) / len(scores),
        "perplexity": perplexity(sum(s.nll for s in scores), len(scores)),
        "num_examples": len(scores),
    }
