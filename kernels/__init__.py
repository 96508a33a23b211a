"""Fused loss kernels: chunked LM-head cross-entropy and distillation KL (Triton + PyTorch)."""

from .linear_losses import (
    CHUNK_ELEMENTS,
    default_chunk_size,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kl_div,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "default_chunk_size",
    "fused_linear_ce_kd",
    "fused_linear_cross_entropy",
    "fused_linear_kl_div",
]
