"""Causal self-attention kernels behind one function: SDPA, flash-attn 2, or the eager reference."""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLEMENTATIONS = ("auto", "sdpa", "flash", "eager")


@cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_available() -> bool:
    return _flash_attn_func() is not None


def _flash_applies(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available()


def resolve_implementation(implementation: str, q: Tensor) -> str:
    """The kernel that ``implementation`` means for inputs like ``q``."""
    if implementation == "auto":
        return "flash" if _flash_applies(q) else "sdpa"
    if implementation == "flash" and not _flash_applies(q):
        raise RuntimeError(
            "attention=flash needs flash-attn 2 installed (pip install 'ted_scale[gpu]') and "
            f"fp16/bf16 CUDA inputs; got {q.dtype} on {q.device}"
            + ("" if flash_available() else " and flash-attn is not installed")
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, implementation: str = "auto"
) -> Tensor:
    """Causal attention over q, k, v of shape [B, n_head, T, head_dim]; returns the same shape."""
    kernel = resolve_implementation(implementation, q)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if kernel == "flash":
        # flash-attn takes [B, T, n_head, head_dim].
        y = _flash_attn_func()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            causal=True,
        )
        return y.transpose(1, 2)
    return causal_attention_with_log_probs(q, k, v, dropout_p=dropout_p)[0]


def causal_attention_with_log_probs(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The eager path, also handing over the attention distribution: returns (output [B, n_head,
    T, head_dim], log-probabilities [B, n_head, T, T], -inf above the diagonal). Used for the one
    layer whose attention a loss reads; the others keep SDPA or flash."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_probs = scores.masked_fill(~mask, float("-inf")).log_softmax(dim=-1)
    probs = F.dropout(log_probs.exp(), p=dropout_p)
    return probs @ v, log_probs
