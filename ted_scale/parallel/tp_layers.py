"""DeepSpeed AutoTP's training layers, able to run a prefix sub-network as ``PrefixLinear`` does
(``forward(x, keep)``: only the first ``keep`` features of each group of the split side), which
MiniDisc's candidates need under tensor parallelism (docs/design.md, "Tensor parallelism"); and
the q/k/v projection of a grouped-query attention whose key/value heads are fewer than the ranks
(``KVReplicatedLinear``).

``keep`` counts features of the whole (unsharded) layer. Rank r holds the contiguous features
[r * local, (r + 1) * local) of each group, so the global prefix [0, keep) is a prefix of every
rank's shard: rank r keeps ``clamp(keep - r * local, 0, local)`` of them, and a rank whose
features all lie beyond ``keep`` keeps none but still joins the row-parallel all-reduce. Imported
only once DeepSpeed's accelerator is chosen (``parallelize_gpt``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.module_inject.layers import (
    ColumnParallel,
    LinearAllreduce,
    LinearLayer,
    RowParallel,
)
from torch import Tensor, nn

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


class KVReplicatedLinear(ColumnParallelLinear):
    """``attn.qkv_proj`` when the group has more ranks than key/value heads (vLLM's layout for
    ``num_kv_heads < tp``): this rank's query rows column-parallel (``weight``, ``bias``), and
    beside them a whole copy of the one key/value head its query heads use (``kv_weight``
    [2 head_dim, d]: that head's k rows, then its v rows; ``kv_bias``), which every rank of the
    head's replica group holds alike (``parallelize_gpt`` sums their gradients over that group).
    """

    def __init__(
        self, q: nn.Linear, kv_weight: Tensor, kv_bias: Tensor | None, mp_group: dist.ProcessGroup
    ) -> None:
        """q: the whole query rows [n_head head_dim, d] (split here); kv_weight, kv_bias: this
        rank's copy of its key/value head."""
        super().__init__(q, mp_group)
        self.kv_weight = nn.Parameter(kv_weight)
        self.kv_bias = None if kv_bias is None else nn.Parameter(kv_bias)

    @property
    def matmul_weights(self) -> tuple[Tensor, ...]:
        return (self.weight, self.kv_weight)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d] (whole) -> [..., q_r + 2 head_dim]: [q_r; k; v] of this rank's heads."""
        # One input-gradient all-reduce for both products: summed over the group, each rank's
        # share (its query heads, and its key/value copy's use by them) adds up to the whole.
        x = ColumnParallel.apply(self.mp_group, x)
        q = F.linear(x, self.weight, self.bias)
        return torch.cat([q, F.linear(x, self.kv_weight, self.kv_bias)], dim=-1)
