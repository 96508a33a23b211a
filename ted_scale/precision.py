"""The precision policy, decided in one place: bf16 autocast on CUDA, fp32 on CPU.

Loss math is always fp32 (the fused kernels and ``ted_scale.distill.objectives`` upcast); this
module only decides the dtype that matmuls run in and the frozen models are stored in.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA (and always under ``bf16``); None means fp32 throughout."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def storage_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype frozen models and frozen filters are kept in: the compute dtype, or fp32."""
    return dtype or torch.float32
