"""KD divergences beyond the fused forward KL, as one per-chunk path for any of them.

The KD term of a chunk of rows is row_weight * T^2 * D(softmax(t / T), softmax(x / T)) with D
one of `torch_ops.DIVERGENCES`, each written once as per-element terms and their derivative
(`torch_ops.divergence_terms`, and its Triton twin). Three steps, the same for a whole head and
for one rank's vocabulary shard (a whole head is a group of one):

1. softmax statistics of x / T and t / T (`shard_stats`), merged over the group into the global
   log-sum-exps (one all-gather);
2. per-row sums of D's terms and of g = dD/dlog p_s over this rank's columns, summed over the
   group (one all-reduce): the rows' D and sum(g);
3. the gradient scale * (g - p_s * sum(g)) written over the teacher logits, 0 in padding columns.

The fused forward KL of `linear_losses` (one sweep, one collective) stays the default's path; this
one costs a second sweep and collective, and is its check. docs/design.md, "KD divergences".
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from .torch_ops import Divergence
from .vocab_parallel import VocabShard, gather_stats, identity_stats, merge_stats


def divergence_chunk_(
    ops: ModuleType,
    logits: Tensor,
    teacher_logits: Tensor,
    row_weight: Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
    kd_weight: float,
    shard: VocabShard | None,
) -> Tensor:
    """KD rows of one chunk; teacher_logits become kd_weight * their gradient w.r.t. logits.

    Args:
        ops: `torch_ops` or `triton_ops`.
        logits: [n, V] student logits (this rank's vocabulary rows with a shard), not modified.
        teacher_logits: [n, V] teacher logits of the same columns, clobbered.
        row_weight: [n] fp32 (0 drops a row, 1/count makes the sum a mean).
        shard: the vocabulary shard these columns are, or None for the whole vocabulary.
    Returns: [n] fp32 rows row_weight * T^2 * D, the same on every rank of the shard's group.
    """
    n, columns = logits.shape
    valid = columns if shard is None else shard.valid_columns(columns)
    x, t = logits[:, :valid], teacher_logits[:, :valid]
    if valid:
        stats = ops.shard_stats(x, None, None, t, temperature)
    else:
        stats = identity_stats(n, False, True, logits.device)
    stats = stats[None] if shard is None else gather_stats(stats, shard.group)
    stats = stats.unbind(dim=2)  # (max a, sum a, max b, sum b, unused), each [world, n]
    lse = torch.stack([merge_stats(*stats[:2])[0], merge_stats(*stats[2:4])[0]], dim=1)
    sums = torch.zeros(n, 2, dtype=torch.float32, device=logits.device)
    if valid:
        sums = ops.divergence_sums(x, t, lse, temperature, divergence, beta)
    if shard is not None:
        dist.all_reduce(sums, group=shard.group)
    if valid:
        scale = kd_weight * temperature * row_weight
        ops.divergence_grad_(x, t, lse, sums[:, 1], scale, temperature, divergence, beta)
    teacher_logits[:, valid:] = 0
    return row_weight * temperature**2 * sums[:, 0]
