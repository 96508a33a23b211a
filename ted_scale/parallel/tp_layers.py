"""DeepSpeed AutoTP's training layers, able to run a prefix sub-network as ``PrefixLinear`` does
(``forward(x, keep)``: only the first ``keep`` features of each group of the split side), which
MiniDisc's candidates need under tensor parallelism (docs/design.md, "Tensor parallelism").

``keep`` counts features of the whole (unsharded) layer. Rank r holds the contiguous features
[r * local, (r + 1) * local) of each group, so the global prefix [0, keep) is a prefix of every
rank's shard: rank r keeps ``clamp(keep - r * local, 0, local)`` of them, and a rank whose
features all lie beyond ``keep`` keeps none but still joins the row-parallel all-reduce. Imported
only once DeepSpeed's accelerator is chosen (``parallelize_gpt``).
"""

from __future__ import annotations

import torch.nn.functional as F
from deepspeed.module_inject.layers import (
    ColumnParallel,
    LinearAllreduce,
    LinearLayer,
    RowParallel,
)
from torch import Tensor

from ted_scale.model.tp_layout import ShardedLinear


def _local_keep(keep: int, local: int, tp_index: int) -> int:
    """How many of this rank's ``local`` features fall inside the global prefix [0, keep)."""
    return min(max(keep - tp_index * local, 0), local)


class ColumnParallelLinear(LinearLayer, ShardedLinear):
    """Column-parallel: the output features split over the ranks, in ``groups`` equal groups
    ([q; k; v] is 3, each split by heads)."""

    groups: int = 1

    def forward(self, x: Tensor, keep: int | None = None) -> Tensor:
        """x [..., d_in] (whole) -> [..., groups * kept] (this rank's kept features)."""
        if keep is None:
            return super().forward(x)
        local = self.weight.shape[0] // self.groups
        kept = _local_keep(keep, local, self.tp_index)
        x = ColumnParallel.apply(self.mp_group, x)
        w = self.weight.view(self.groups, local, -1)[:, :kept].reshape(-1, self.weight.shape[1])
        b = self.bias.view(self.groups, local)[:, :kept].reshape(-1)
        return F.linear(x, w, b)


class RowParallelLinear(LinearAllreduce, ShardedLinear):
    """Row-parallel: the input features split over the ranks, partial outputs all-reduced, the
    (replicated) bias added once."""

    def forward(self, x: Tensor, keep: int | None = None) -> Tensor:
        """x [..., this rank's kept features] -> [..., d_out] (whole)."""
        if keep is None:
            return super().forward(x)
        kept = _local_keep(keep, self.weight.shape[1], self.tp_index)
        partial = F.linear(x, self.weight[:, :kept])
        return RowParallel.apply(self.mp_group, partial, not self.is_training_mode()) + self.bias
