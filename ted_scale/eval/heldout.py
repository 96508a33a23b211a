"""Held-out perplexity on a split written by `launch/prepare_data.py`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ted_scale.data.loader import DistributedBatchLoader, open_split
from ted_scale.data.tokenizer import tokenizer_fingerprint
from ted_scale.eval import EvalError
from ted_scale.eval.scoring import IGNORE_INDEX, eval_mode, model_device, perplexity, score_tokens
from ted_scale.model import GPT


def heldout_perplexity(
    model: GPT,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity and next-token accuracy over (input_ids [B, T], labels [B, T])
    batches.

    labels are the already-shifted next tokens, IGNORE_INDEX (-100) on padding. Only the first
    `max_batches` batches are used when given. Returns {"perplexity", "accuracy" (the fraction of
    tokens whose greedy prediction is the label, in [0, 1]), "num_tokens", "loss" (mean NLL),
    "nll_sum", "num_correct"}; a data-parallel caller all-reduces nll_sum, num_correct and
    num_tokens.
    """
    device = torch.device(device) if device is not None else model_device(model)
    vocab_size = model.config.vocab_size
    total, count, correct = 0.0, 0, 0
    with eval_mode(model):
        for input_ids, labels in tqdm(
            itertools.islice(batches, max_batches), desc="heldout", disable=not progress
        ):
            if int(input_ids.max()) >= vocab_size or int(labels.max()) >= vocab_size:
                raise EvalError(
                    f"held-out data: token id {max(int(input_ids.max()), int(labels.max()))} is "
                    f"outside the model's vocabulary of {vocab_size}"
                )
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            scores = score_tokens(model, input_ids, labels)
            total += scores.nll.double().sum().item()
            correct += int(scores.correct.sum())  # False wherever the label is ignored
            count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise EvalError("held-out data: no tokens to evaluate")
    return {
        "perplexity": perplexity(total, count),
        "accuracy": correct / count,
        "num_tokens": count,
        "num_correct": correct,
        "loss": total / count,
        "nll_sum": total,
    }


def evaluate_heldout(
    model: GPT,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Held-out perplexity and next-token accuracy on `split` of a prepared data directory, every
    sample once.

    The split must have been tokenised with `tokenizer` and fit the model's context.
    """
    dataset = open_split(
        data_dir,
        split,
        expected_tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        max_positions=model.config.n_positions,
    )
    loader = DistributedBatchLoader(dataset, batch_size, drop_last=False, pin_memory=False)
    result = heldout_perplexity(
        model, loader, device=device, max_batches=max_batches, progress=progress
    )
    return {**result, "split": split, "data": str(data_dir)}
