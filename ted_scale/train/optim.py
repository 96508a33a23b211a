"""AdamW and the linear warm-up / linear decay schedule."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ted_scale.config.schema import OptimConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be dropped, leaving weights and optimizer state untouched.

    Without ZeRO, DeepSpeed steps the client optimizer itself; it reads ``overflow`` afterwards,
    exactly as from its own ZeRO optimizers, so a dropped step is counted in ``skipped_steps`` and
    the learning-rate schedule does not advance.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.overflow = False

    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float) -> SkippableAdamW:
    """AdamW over the trainable parameters; biases and LayerNorm weights get no weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: the model has no parameter that requires a gradient")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch's fused AdamW (one kernel over all parameters) on CPU and CUDA: 5-7x faster than
    # the per-tensor loop on the CPU's tied embedding. Other devices keep the foreach one.
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable)
    return SkippableAdamW(
        [g for g in groups if g["params"]],
        lr=lr,
        betas=config.betas,
        eps=config.eps,
        fused=fused,
    )


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> LambdaLR:
    """lr rises linearly from 0 over the warm-up, then falls linearly to ``min_lr_ratio * lr``."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return max(min_lr_ratio, 1.0 - progress * (1.0 - min_lr_ratio))

    return LambdaLR(optimizer, factor)
