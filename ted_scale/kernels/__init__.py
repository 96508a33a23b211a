"""Fused loss kernels: chunked LM-head cross-entropy and distillation divergences (Triton +
PyTorch), whole or over a vocabulary-parallel head."""

from .linear_losses import (
    CHUNK_ELEMENTS,
    default_chunk_size,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kd,
)
from .torch_ops import DIVERGENCES, Divergence, divergence_terms
from .vocab_parallel import VocabShard, vocab_parallel_token_scores

__all__ = [
    "CHUNK_ELEMENTS",
    "DIVERGENCES",
    "Divergence",
    "VocabShard",
    "default_chunk_size",
    "divergence_terms",
    "fused_linear_ce_kd",
    "fused_linear_cross_entropy",
    "fused_linear_kd",
    "vocab_parallel_token_scores",
]
