"""Per-token negative log-likelihood of a GPT's next-token predictions.

The fused path runs the model without its LM head and applies the head only to the rows that are
scored, a chunk of rows at a time, so the full [B, T, V] logits never exist (for GPT-2 at
B=16, T=1024 they would be 3.3 GB in fp32). The head runs in fp32 even under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ted_scale.data.loader import IGNORE_INDEX
from ted_scale.kernels import vocab_parallel_token_scores
from ted_scale.model import GPT
from ted_scale.precision import autocast, compute_dtype


@dataclass
class TokenScores:
    """nll: [B, T] float32 (0 where not scored); correct: [B, T] bool, greedy argmax == target."""

    nll: Tensor
    correct: Tensor


@dataclass
class SequenceScore:
    """Totals over the scored tokens of one sequence."""

    nll: float  # summed NLL (nats)
    all_correct: bool  # every scored token is the greedy prediction
    num_tokens: int


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch to eval mode (no dropout) for the block and restore the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rows_nll(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """logits [N, V] fp32, targets [N] -> (nll [N], correct [N])."""
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
    return nll, logits.argmax(dim=-1) == targets


@torch.no_grad()
def score_tokens(
    model: GPT, input_ids: Tensor, targets: Tensor, *, fused: bool = True, chunk_rows: int = 1024
) -> TokenScores:
    """Score next-token predictions.

    input_ids: [B, T] int64. targets: [B, T] int64, the token expected after each position, or
    IGNORE_INDEX where the position is not scored. fused=False computes the full [B, T, V] logits
    (a reference for the fused path). A model sharded by tensor parallelism is scored with the
    vocabulary-parallel statistics (a collective: every rank of its group calls this).
    """
    mask = targets != IGNORE_INDEX
    scored = targets[mask]  # [N]
    with autocast(input_ids.device, compute_dtype("auto", input_ids.device)):
        out = model(input_ids, return_logits=not fused)
    head, shard = model.loss_head()  # the rows that are tokens (``GPT.vocab_in_use``)
    if shard is not None:  # a vocabulary-parallel head: every rank of its group takes part
        hidden = out.last_hidden[mask].float()
        rows_nll, rows_correct = vocab_parallel_token_scores(
            hidden, head.float(), scored, shard, chunk_rows=chunk_rows
        )
    elif fused:
        hidden = out.last_hidden[mask].float()  # [N, d]: only the scored rows
        weight = head.float()  # [V, d]
        parts = [
            _rows_nll(F.linear(hidden[i : i + chunk_rows], weight), scored[i : i + chunk_rows])
            for i in range(0, hidden.shape[0], chunk_rows)
        ]
        rows_nll = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0)
        rows_correct = torch.cat([p[1] for p in parts]) if parts else mask.new_zeros(0)
    else:
        rows_nll, rows_correct = _rows_nll(out.logits.float()[mask][:, : head.shape[0]], scored)
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    correct = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    nll[mask] = rows_nll
    correct[mask] = rows_correct
    return TokenScores(nll=nll, correct=correct)


def collate(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(inputs, targets) pairs of equal length per pair -> right-padded [B, T] tensors.

    Padding inputs are token 0 and padding targets IGNORE_INDEX: attention is causal, so padding
    on the right never changes a scored position.
    """
    width = max(len(inputs) for inputs, _ in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    tgt = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(examples):
        ids[row, : len(inputs)] = torch.as_tensor(inputs, dtype=torch.long)
        tgt[row, : len(targets)] = torch.as_tensor(targets, dtype=torch.long)
    return ids.to(device), tgt.to(device)


def score_sequences(
    model: GPT,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    device: torch.device,
    fused: bool = True,
    desc: str = "scoring",
    progress: bool = False,
) -> list[SequenceScore]:
    """Score many (inputs, targets) sequences (targets IGNORE_INDEX where not scored), batched.

    Sequences are batched longest first (less padding); results come back in input order.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    results: list[SequenceScore | None] = [None] * len(examples)
    with eval_mode(model), tqdm(total=len(examples), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, tgt = collate([examples[i] for i in idx], device)
            scores = score_tokens(model, ids, tgt, fused=fused)
            mask = tgt != IGNORE_INDEX
            nll = scores.nll.double().sum(dim=1).tolist()
            all_correct = (scores.correct | ~mask).all(dim=1).tolist()
            counts = mask.sum(dim=1).tolist()
            for row, i in enumerate(idx):
                results[i] = SequenceScore(nll[row], all_correct[row], counts[row])
            bar.update(len(idx))
    return results  # type: ignore[return-value]


def perplexity(total_nll: float, count: int) -> float:
    """exp(total_nll / count), inf when the mean overflows."""
    mean = total_nll / count
    return math.exp(mean) if mean < 700 else math.inf
