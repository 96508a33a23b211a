"""Vocabulary-parallel losses: the LM head split by vocabulary rows over a tensor-parallel group.

Rank r holds rows [start, start + V_r) of a head whose row count was padded (Megatron: to a
multiple of 128 x TP); ids >= the true vocabulary size are padding, kept out of every loss,
gradient and score whatever their weight rows hold. Per chunk of rows each rank computes its
shard's softmax statistics (`torch_ops.shard_stats` / `triton_ops.shard_stats`), one all-gather
over the group brings every shard's statistics to every rank, each rank merges them into the
global log-sum-exps and losses (the same on every rank) and finishes its own shard's gradient
(`shard_grad_`). No rank ever holds full-vocabulary logits. docs/design.md, "Vocabulary-parallel
losses", has the algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from .torch_ops import CE_STATS, stats_width


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a vocabulary-parallel LM head.

    group: the tensor-parallel group the vocabulary is split over.
    start: the first global vocabulary id of this rank's weight rows.
    vocab_size: the true (unpadded) vocabulary; ids >= vocab_size are padding.
    """

    group: dist.ProcessGroup
    start: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.vocab_size < 1:
            raise ValueError(
                f"VocabShard needs start >= 0 and vocab_size >= 1, got start={self.start}, "
                f"vocab_size={self.vocab_size}"
            )

    def valid_columns(self, shard_rows: int) -> int:
        """How many of this rank's shard_rows ids are real vocabulary: a prefix of its columns."""
        return max(0, min(shard_rows, self.vocab_size - self.start))

    def local_targets(self, targets: Tensor, valid: int) -> Tensor:
        """Global ids -> column ids of this shard's first `valid` columns, -1 outside them."""
        local = targets - self.start
        return torch.where((local >= 0) & (local < valid), local, -1)


def gather_stats(stats: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[n, S] from every rank of group -> [world, n, S], in rank order (one collective)."""
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts)


def merge_stats(scaled_max: Tensor, total: Tensor, *sums: Tensor) -> tuple[Tensor, ...]:
    """Shards' (max m_r, sum_r of exp(z - m_r), further sums_r relative to m_r), each [world, n]
    -> (global lse [n], global sum of exp(z - max) [n], the further sums relative to it [n]).
    A shard without columns has m_r = -inf and contributes exp(-inf) = 0."""
    global_max = scaled_max.amax(dim=0)
    rescale = torch.exp(scaled_max - global_max)
    total = (total * rescale).sum(dim=0)
    return global_max + total.log(), total, *((s * rescale).sum(dim=0) for s in sums)


def identity_stats(n: int, with_ce: bool, with_kd: bool, device: torch.device) -> Tensor:
    """The statistics of a shard with no vocabulary columns (all padding): maxima -inf, sums 0."""
    stats = torch.zeros(n, stats_width(with_ce, with_kd), device=device)
    max_columns = ([0] if with_ce else []) + [CE_STATS * with_ce + i for i in (0, 2) if with_kd]
    stats[:, max_columns] = -float("inf")
    return stats


def shard_chunk_(
    ops: ModuleType,
    shard: VocabShard,
    logits: Tensor,
    targets: Tensor | None = None,
    ce_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    kd_row_weight: Tensor | None = None,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
) -> tuple[Tensor | None, Tensor | None]:
    """CE and KD rows of one chunk over the whole vocabulary; this shard's logits become the grad.

    Args:
        ops: `torch_ops` or `triton_ops`.
        logits: [n, V_r] this shard's student logits; teacher_logits [n, V_r] or None (no KD),
            clobbered.
        targets: [n] (or [n, k]) global ids in [0, vocab_size), ce_weight of the same shape
            (fp32, 0 drops a target), or None (no CE).
        kd_row_weight: [n] fp32 KD row weights; KD rows are kd_row_weight * T^2 * KL(p_t || p_s).
    Returns: (ce [n] or None, kd [n] or None) fp32, the same on every rank of shard.group; logits
    become d(ce + kd_weight * kd)/dlogits, 0 in padding columns.
    """
    n, shard_rows = logits.shape
    with_ce, with_kd = targets is not None, teacher_logits is not None
    valid = shard.valid_columns(shard_rows)
    x = logits[:, :valid]
    t = teacher_logits[:, :valid] if with_kd else None
    local = shard.local_targets(targets, valid) if with_ce else None
    if valid:
        stats = ops.shard_stats(x, local, ce_weight, t, temperature)
    else:
        stats = identity_stats(n, with_ce, with_kd, logits.device)
    stats = gather_stats(stats, shard.group).unbind(dim=2)  # S tensors [world, n]
    lse = torch.zeros(n, 3, dtype=torch.float32, device=logits.device)  # x, x / T, t / T
    ce = kd = kd_scale = None
    if with_ce:
        lse[:, 0] = merge_stats(*stats[:2])[0]
        ce = ce_weight.view(n, -1).sum(dim=1) * lse[:, 0] - stats[2].sum(dim=0)
        stats = stats[CE_STATS:]
    if with_kd:
        lse[:, 1] = merge_stats(*stats[:2])[0]
        lse[:, 2], total_b, cross = merge_stats(*stats[2:])
        kd = kd_row_weight * temperature**2 * (cross / total_b - lse[:, 2] + lse[:, 1])
        kd_scale = kd_weight * temperature * kd_row_weight  # d(T^2 KL)/dx = T (p_s - p_t)
    if valid:
        ops.shard_grad_(x, local, ce_weight, lse, t, kd_scale, temperature)
    logits[:, valid:] = 0
    return ce, kd


@torch.no_grad()
def vocab_parallel_token_scores(
    hidden: Tensor, weight: Tensor, targets: Tensor, shard: VocabShard, *, chunk_rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """Next-token NLL and greedy correctness over a vocabulary-parallel head, chunk by chunk.

    The vocabulary-parallel form of `ted_scale.eval.scoring._rows_nll` on the full head: logits
    in fp32, padding ids never scored nor predicted. Ties for the argmax go to the lowest id, as
    torch.argmax does on the full logits.

    Args: hidden [N, d]; weight [V_r, d] this rank's head rows; targets [N] global ids in
    [0, vocab_size). Returns (nll [N] fp32, correct [N] bool), the same on every rank.
    """
    weight = weight[: shard.valid_columns(weight.shape[0])].float()
    nll, correct = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, target = hidden[start : start + chunk_rows].float(), targets[start : start + chunk_rows]
        # fp64 statistics: the argmax ids stay exact; nothing [n, V] is in fp64.
        stats = torch.zeros(h.shape[0], 4, dtype=torch.float64, device=h.device)
        stats[:, 0], stats[:, 3] = -float("inf"), float("inf")  # max, argmax id
        if weight.shape[0]:
            logits = h @ weight.T
            best = logits.argmax(dim=1, keepdim=True)
            best_logit = logits.gather(1, best)
            local = shard.local_targets(target, weight.shape[0])[:, None]
            target_logit = torch.where(local >= 0, logits.gather(1, local.clamp(min=0)), 0.0)
            stats[:, 0], stats[:, 2] = best_logit[:, 0], target_logit[:, 0]
            stats[:, 1] = (logits - best_logit).exp().sum(dim=1)
            stats[:, 3] = best[:, 0] + shard.start
        best_logit, total, target_logit, best = gather_stats(stats, shard.group).unbind(dim=2)
        lse = merge_stats(best_logit, total)[0]
        nll.append((lse - target_logit.sum(dim=0)).float())
        # The lowest id among the shards holding the global max.
        best = torch.where(best_logit == best_logit.amax(dim=0), best, float("inf")).amin(dim=0)
        correct.append(best == target)
    if not nll:
        return hidden.new_zeros(0, dtype=torch.float32), targets.new_zeros(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(correct)
