"""The non-finite loss policy: stop, or skip up to ``skip_nonfinite`` steps, and say where to
resume from.

Stopping (``skip_nonfinite: 0``, the default) reads nothing on the host per step: the first
non-finite step is kept in a device tensor and read (``verify``) where the host reads anyway, at
a metrics line, before a checkpoint is written and at the phase's end, so a checkpoint never holds
weights a non-finite step touched and the error names that step. Skipping must decide before the
update, so it costs one host read per optimizer step. A skipped step changes no weight and no
optimizer state: under ZeRO >= 1 DeepSpeed's overflow check drops it (its gradients are not
finite either); without ZeRO the gradients are zeroed (gradient clipping must still see tensors)
and the client optimizer drops the step. Either way DeepSpeed counts it in
``engine.skipped_steps``, which is what is reported.
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
        self._first_bad: Tensor | None = None  # stopping: the first bad step on this rank, or 0
        self._parts: dict[str, Tensor] = {}

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

        Skipping: raises ``NonFiniteLossError`` once more than ``limit`` steps would have been
        skipped. Stopping: only records the step on the device (see ``verify``).
        """
        bad = ~torch.isfinite(step_loss)
        if self.limit == 0:
            if self._first_bad is None:
                self._first_bad = torch.zeros((), dtype=torch.long, device=step_loss.device)
            self._first_bad = torch.where(bad & (self._first_bad == 0), step, self._first_bad)
            self._parts = parts
            return
        bad = bad.float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.last_step_bad = bool(bad.item())
        if not self.last_step_bad:
            return
        if self.skipped >= self.limit:
            self._raise(step, step, parts, last_checkpoint)
        optimizer = self.engine.optimizer
        if isinstance(optimizer, SkippableAdamW):  # no ZeRO: DeepSpeed steps our optimizer
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            optimizer.skip_next = True
        self.log(f"step {step}: non-finite loss, step skipped ({self.skipped + 1} so far)")

    def verify(self, step: int, last_checkpoint: Callable[[], Path | None]) -> None:
        """Stopping: raise ``NonFiniteLossError`` if any rank saw a non-finite loss up to
        ``step`` (a host read and, across ranks, a collective: every rank calls it)."""
        if self.limit or self._first_bad is None:
            return
        # The earliest bad step of any rank: 0 (none) counts as never.
        first = torch.where(self._first_bad > 0, self._first_bad, torch.iinfo(torch.long).max)
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.group)
        first = int(first.item())
        if first != torch.iinfo(torch.long).max:
            self._raise(first, step, self._parts, last_checkpoint)

    def saves(self, step: int, last_checkpoint: Callable[[], Path | None]) -> bool:
        """Whether ``step``'s weights may be checkpointed: never after a non-finite step (stopping
        raises here, skipping skips that step's checkpoint)."""
        self.verify(step, last_checkpoint)
        return not self.last_step_bad

    @staticmethod
    def _raise(
        bad_step: int,
        step: int,
        parts: dict[str, Tensor],
        last_checkpoint: Callable[[], Path | None],
    ) -> None:
        values = {k: float(v) for k, v in parts.items()}
        where = last_checkpoint() or "none (no checkpoint yet)"
        seen = "" if bad_step == step else f" (seen at step {step}, whose parts these are)"
        raise NonFiniteLossError(
            f"non-finite loss at step {bad_step}{seen}: {values}; last good checkpoint: {where}"
        )
