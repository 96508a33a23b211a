"""The non-finite loss policy: stop, or skip up to ``skip_nonfinite`` steps, and say where to
resume from.

One host sync per optimizer step. A skipped step changes no weight and no optimizer state: under
ZeRO >= 1 DeepSpeed's overflow check drops it (its gradients are not finite either); without ZeRO
the gradients are zeroed (gradient clipping must still see tensors) and the client optimizer drops
the step. Either way DeepSpeed counts it in ``engine.skipped_steps``, which is what is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ted_scale.train.optim import SkippableAdamW


class NonFiniteLossError(RuntimeError):
    """The loss stopped being a finite number."""


class NonFiniteGuard:
    def __init__(self, engine, *, limit: int, group: dist.ProcessGroup | None, log) -> None:
        self.engine = engine
        self.limit = limit
        self.group = group
        self.log = log
        self.last_step_bad = False

    @property
    def skipped(self) -> int:
        return self.engine.skipped_steps

    def check(
        self,
        step_loss: Tensor,
        step: int,
        parts: dict[str, Tensor],
        last_checkpoint: Callable[[], Path | None],
    ) -> None:
        """Call before ``engine.step()`` at an accumulation boundary with the step's summed loss.

        Raises ``NonFiniteLossError`` once more than ``limit`` steps would have been skipped.
        """
        bad = (~torch.isfinite(step_loss)).float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.last_step_bad = bool(bad.item())
        if not self.last_step_bad:
            return
        if self.skipped >= self.limit:
            values = {k: float(v) for k, v in parts.items()}
            where = last_checkpoint() or "none (no checkpoint yet)"
            raise NonFiniteLossError(
                f"non-finite loss at step {step}: {values}; last good checkpoint: {where}"
            )
        optimizer = self.engine.optimizer
        if isinstance(optimizer, SkippableAdamW):  # no ZeRO: DeepSpeed steps our optimizer
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            optimizer.skip_next = True
        self.log(f"step {step}: non-finite loss, step skipped ({self.skipped + 1} so far)")
