"""PyTorch per-chunk loss arithmetic: the CPU path and the oracle for the Triton kernels.

Every function takes one chunk of logits [n, V] (any float dtype), computes in fp32, returns
per-row losses already multiplied by `row_weight` [n] (fp32; 0 drops a row, 1/count makes the
sum a mean), and overwrites the student logits in place with d(sum of returned rows)/d(logits),
so the caller never holds a second [n, V] buffer (teacher logits may be clobbered as scratch).
Targets must lie in [0, V): callers replace ignored targets by 0 and give those rows weight 0.
A row's CE may have k targets ([n, k] targets with [n, k] weights: sum_i w_i CE(x, t_i), the
mixup CE lambda * CE(y) + (1 - lambda) * CE(y_rev) in one logits pass); [n] means k = 1.
`triton_ops` has the same functions.

A chunk (51 MB for 256 GPT-2 rows) is far bigger than the CPU caches, so every element-wise op
over all of it would be a trip to DRAM. The functions therefore walk the chunk in blocks of a few
rows whose working set stays in cache, run all passes of a block there in place or into two
reused scratch buffers, and follow the Triton kernels' algebra: one exp per softmax, with the
row sums kept apart and folded into the gradient's per-row scale factors.
"""

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
DIVERGENCES: tuple[Divergence, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd")

# Elements per block of rows (10 GPT-2 rows): a block's student and teacher rows and two fp32
# scratch buffers (8 MB) stay in L2/L3 between passes, and ~20 ops per block keep the per-op
# dispatch overhead small (2^17-2^21 measured within 15% of each other on one core).
BLOCK_ELEMENTS = 2**19
LOG2E = 1.4426950408889634


def _block_rows(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // vocab)


def _blocks(n: int, vocab: int) -> Iterator[slice]:
    rows = _block_rows(vocab)
    for start in range(0, n, rows):
        yield slice(start, start + rows)


def _max_exp_rows_(x: Tensor, scale: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """out = exp(scale * (x - max x)) per row of x [b, V] (out may be x); scale > 0.

    Returns (scale * max x, sum of out) [b, 1]. Uses exp2 on pre-scaled arguments: on CPU
    torch's exp goes through a vector math library path about 3x slower than exp2.
    """
    m = x.amax(dim=-1, keepdim=True)
    torch.add(m * (-scale * LOG2E), x, alpha=scale * LOG2E, out=out).exp2_()
    return m * scale, out.sum(dim=-1, keepdim=True)


def _exp_rows_(x: Tensor, scale: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """As `_max_exp_rows_`, returning (logsumexp(scale * x), sum of out) [b, 1]."""
    scaled_max, total = _max_exp_rows_(x, scale, out)
    return scaled_max + total.log(), total


def _softmax_rows_(x: Tensor, scale: float, lse: Tensor, out: Tensor) -> Tensor:
    """out = exp(scale * x - lse) for x [b, V] and a given lse [b, 1] (out may be x)."""
    return torch.add(lse * -LOG2E, x, alpha=scale * LOG2E, out=out).exp2_()


def _per_target(targets: Tensor, weights: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
    """Rows of targets [n] or [n, k] and their weights as [b, k] each."""
    b = targets[rows].shape[0]
    return targets[rows].view(b, -1), weights[rows].view(b, -1)


def _cross_entropy_block_(x: Tensor, targets: Tensor, w: Tensor) -> Tensor:
    """CE rows sum_i w_i (lse - x[t_i]) of fp32 logits x [b, V] with targets, weights w [b, k];
    overwrites x with their gradient sum_i w_i * (softmax - onehot(t_i))."""
    target_logit = x.gather(1, targets)
    lse, total = _exp_rows_(x, 1.0, x)
    x.mul_(w.sum(dim=1, keepdim=True) / total).scatter_add_(1, targets, -w)
    return (w * (lse - target_logit)).sum(dim=1)


def _kd_block_(
    x: Tensor,
    t: Tensor,
    scratch: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
) -> tuple[Tensor | None, Tensor]:
    """T^2 KL(p_t || p_s) rows (and CE rows unless targets is None) of fp32 logits x [b, V];
    targets and their CE weights are [b, k], row_weight [b] weighs KD.

    Overwrites x with d(CE + kd_weight * KD)/dx; t (fp32 teacher logits) and scratch [k, b, V]
    (k = 1, or 2 with CE) are clobbered. With a = x/T, b = t/T and e_b = exp(b - max b), as in the Triton kernel:
    KL = sum(e_b * (b - a)) / sum(e_b) - lse(b) + lse(a), and d(T^2 KL)/dx = T * (p_s - p_t).

    Passes over [b, V] (an op each; exp the costly one): teacher 4 (max, scale, exp, sum), the
    cross term 3, student 4 (max, scale, exp, sum), CE's softmax at T = 1 from the student's at T
    by squaring at the default T = 2 (1 + its sum; T = 1: none, another T: its own 3 and a sum),
    the gradient 2-3. 16 with CE at T = 2, 2 exps per logit (18 and 3 before, issue 29).
    """
    inv_t = 1.0 / temperature
    e_t = scratch[0]
    lse_t, total_t = _exp_rows_(t, inv_t, e_t)
    cross = t.sub_(x).mul_(e_t).sum(dim=-1, keepdim=True) * inv_t
    ce = e_ce = None
    if targets is not None:
        target_logit = x.gather(1, targets)
        if temperature not in (1.0, 2.0):  # CE's own softmax, before x is overwritten
            lse_ce, total_ce = _exp_rows_(x, 1.0, scratch[1])
            e_ce = scratch[1]
    scaled_max, total_s = _max_exp_rows_(x, inv_t, x)  # x = exp((x - max x) / T)
    lse_s = scaled_max + total_s.log()
    if targets is not None:
        if temperature == 1.0:
            e_ce, lse_ce, total_ce = x, lse_s, total_s
        elif temperature == 2.0:  # exp(x - max x) = exp((x - max x) / 2)^2
            e_ce = torch.mul(x, x, out=scratch[1])
            total_ce = e_ce.sum(dim=-1, keepdim=True)
            lse_ce = 2.0 * scaled_max + total_ce.log()
        ce = (ce_weight * (lse_ce - target_logit)).sum(dim=1)
    kd = row_weight * temperature**2 * (cross / total_t - lse_t + lse_s).squeeze(1)
    # gradient: kd_weight * w * T * (p_s - p_t) [+ sum_i w_i * (softmax(x) - onehot(t_i))]
    scale = kd_weight * temperature * row_weight[:, None]
    x_scale = scale / total_s
    if e_ce is x:  # T = 1: one softmax serves both terms
        x_scale = x_scale + ce_weight.sum(dim=1, keepdim=True) / total_ce
    x.mul_(x_scale).addcmul_(e_t, -scale / total_t)
    if targets is not None:
        if e_ce is not x:
            x.addcmul_(e_ce, ce_weight.sum(dim=1, keepdim=True) / total_ce)
        x.scatter_add_(1, targets, -ce_weight)
    return ce, kd


def cross_entropy_(logits: Tensor, targets: Tensor, row_weight: Tensor) -> Tensor:
    """Cross-entropy per row; logits [n, V] become dloss/dlogits.

    Args: logits [n, V]; targets [n] (or [n, k]) long in [0, V); row_weight [n] (or [n, k],
    one weight per target) fp32. Returns [n] fp32.
    """
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for rows in _blocks(*logits.shape):
        x = logits[rows].float()  # the same view when logits are fp32: computed in place
        loss[rows] = _cross_entropy_block_(x, *_per_target(targets, row_weight, rows))
        if x.dtype != logits.dtype:
            logits[rows] = x
    return loss


def _kd_chunk_(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
) -> tuple[Tensor | None, Tensor]:
    """Runs `_kd_block_` over blocks of rows; returns (ce [n] or None, kd [n])."""
    n, vocab = logits.shape
    kd = torch.empty(n, dtype=torch.float32, device=logits.device)
    ce = None if targets is None else torch.empty_like(kd)
    scratch_shape = (1 if targets is None else 2, min(n, _block_rows(vocab)), vocab)
    scratch = torch.empty(scratch_shape, dtype=torch.float32, device=logits.device)
    for rows in _blocks(n, vocab):
        x = logits[rows].float()
        b = x.shape[0]
        block_targets = block_ce_weight = None
        if targets is not None:
            block_targets, block_ce_weight = _per_target(targets, ce_weight, rows)
        block_ce, kd[rows] = _kd_block_(
            x, teacher_logits[rows].float(), scratch[:, :b], block_targets, block_ce_weight,
            row_weight[rows], temperature, kd_weight,
        )  # fmt: skip
        if ce is not None:
            ce[rows] = block_ce
        if x.dtype != logits.dtype:
            logits[rows] = x
    return ce, kd


def kl_div_(
    logits: Tensor, teacher_logits: Tensor, row_weight: Tensor, temperature: float
) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 per row; student logits [n, V] become the gradient.

    Args: logits, teacher_logits [n, V]; row_weight [n] fp32. Returns [n] fp32.
    """
    return _kd_chunk_(logits, teacher_logits, None, None, row_weight, temperature, 1.0)[1]


def cross_entropy_kl_div_(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CE and KD rows from one student logits chunk; logits become d(CE + kd_weight*KD)/dlogits.

    Args: logits, teacher_logits [n, V]; targets [n] (or [n, k]) long in [0, V); row_weight [n]
    fp32, KD's weights and CE's too unless ce_weight [n] (or [n, k], one per target) is given.
    Returns (ce [n], kd [n]) fp32.
    """
    ce_weight = row_weight if ce_weight is None else ce_weight
    return _kd_chunk_(
        logits, teacher_logits, targets, ce_weight, row_weight, temperature, kd_weight
    )


# The vocabulary-parallel split of the ops above (`vocab_parallel.py`, docs/design.md
# "Vocabulary-parallel losses"): a statistics pass over one shard's logits, the TP group's
# reduction, then a gradient pass with the global log-sum-exps. In the split ops targets are
# column ids of the shard, or -1 where a row's target lies in another shard.
CE_STATS = 3  # max x, sum exp(x - max x), sum_j w_j x[t_j] over the targets in this shard
KD_STATS = 5  # max a, sum exp(a - max a), max b, sum e_b, sum e_b * (b - a); e_b = exp(b - max b)


def stats_width(with_ce: bool, with_kd: bool) -> int:
    """Columns of `shard_stats`: the CE statistics first, then the KD ones."""
    return CE_STATS * with_ce + KD_STATS * with_kd


def _in_shard(targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(targets [b, k] clamped into the shard, weights [b, k] zeroed for targets outside it)."""
    inside = targets >= 0
    return targets.clamp(min=0), torch.where(inside, weights, 0.0)


def _shard_stats_block(
    x: Tensor, t: Tensor | None, scratch: Tensor, targets: Tensor | None, w: Tensor | None,
    inv_t: float,
) -> Tensor:  # fmt: skip
    """`shard_stats` of fp32 logits x [b, V] (and teacher t [b, V]); scratch [2, b, V]."""
    parts = []
    if targets is not None:
        scaled_max, total = _max_exp_rows_(x, 1.0, scratch[0])
        index, w_in = _in_shard(targets, w)
        parts += [scaled_max, total, (w_in * x.gather(1, index)).sum(dim=1, keepdim=True)]
    if t is not None:
        parts += _max_exp_rows_(x, inv_t, scratch[0])
        max_b, total_b = _max_exp_rows_(t, inv_t, scratch[1])
        cross = torch.sub(t, x, out=scratch[0]).mul_(scratch[1]).sum(dim=-1, keepdim=True)
        parts += [max_b, total_b, cross * inv_t]
    return torch.cat(parts, dim=1)


def _shard_grad_block_(
    x: Tensor, t: Tensor | None, scratch: Tensor, targets: Tensor | None, w: Tensor | None,
    lse: Tensor, kd_scale: Tensor | None, inv_t: float,
) -> None:  # fmt: skip
    """`shard_grad_` of fp32 logits x [b, V] in place (t is clobbered); scratch [2, b, V]."""
    if t is None:
        _softmax_rows_(x, 1.0, lse[:, 0:1], x).mul_(w.sum(dim=1, keepdim=True))
    else:
        p_t = _softmax_rows_(t, inv_t, lse[:, 2:3], t)
        if targets is not None:
            p_x = _softmax_rows_(x, 1.0, lse[:, 0:1], scratch[0])
        _softmax_rows_(x, inv_t, lse[:, 1:2], x).sub_(p_t).mul_(kd_scale[:, None])
        if targets is not None:
            x.addcmul_(p_x, w.sum(dim=1, keepdim=True))
    if targets is not None:
        index, w_in = _in_shard(targets, w)
        x.scatter_add_(1, index, -w_in)


def _shard_blocks(
    logits: Tensor, teacher_logits: Tensor | None, targets: Tensor | None, ce_weight: Tensor | None
) -> Iterator[tuple[slice, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]]:
    """(rows, x, t, scratch, targets, weights) per block: fp32 views (copies for other dtypes)."""
    n, vocab = logits.shape
    scratch = torch.empty(
        (2, min(n, _block_rows(vocab)), vocab), dtype=torch.float32, device=logits.device
    )
    for rows in _blocks(n, vocab):
        x = logits[rows].float()
        t = None if teacher_logits is None else teacher_logits[rows].float()
        block_targets = block_weights = None
        if targets is not None:
            block_targets, block_weights = _per_target(targets, ce_weight, rows)
        yield rows, x, t, scratch[:, : x.shape[0]], block_targets, block_weights


def shard_stats(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-row softmax statistics of one vocabulary shard's logits chunk (not modified).

    Args: logits [n, V] (this shard's columns); targets [n] (or [n, k]) long shard column ids or
    -1, with their CE weights ce_weight of the same shape, or None without CE; teacher_logits
    [n, V] or None without KD. Returns [n, stats_width(...)] fp32: with a = x / T, b = t / T,
    CE's (max x, sum exp(x - max x), sum_j w_j x[t_j]) then KD's (max a, sum exp(a - max a),
    max b, sum e_b, sum e_b * (b - a)) with e_b = exp(b - max b).
    """
    width = stats_width(targets is not None, teacher_logits is not None)
    stats = torch.empty(logits.shape[0], width, dtype=torch.float32, device=logits.device)
    for rows, x, t, scratch, block_targets, w in _shard_blocks(
        logits, teacher_logits, targets, ce_weight
    ):
        stats[rows] = _shard_stats_block(x, t, scratch, block_targets, w, 1.0 / temperature)
    return stats


def shard_grad_(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    lse: Tensor,
    teacher_logits: Tensor | None = None,
    kd_scale: Tensor | None = None,
    temperature: float = 1.0,
) -> None:
    """Overwrites one shard's logits [n, V] with their gradient, from the global statistics.

    The gradient is sum_j w_j (softmax(x) - onehot(t_j)) with targets (as in `shard_stats`) plus
    kd_scale * (softmax(x / T) - softmax(t / T)) with teacher_logits (clobbered), the softmaxes
    over the full vocabulary through lse [n, 3] fp32: (lse(x), lse(x / T), lse(t / T)), columns
    unused without CE or KD. kd_scale: [n] fp32 (kd_weight * T * KD row weight).
    """
    for rows, x, t, scratch, block_targets, w in _shard_blocks(
        logits, teacher_logits, targets, ce_weight
    ):
        scale = None if kd_scale is None else kd_scale[rows]
        _shard_grad_block_(x, t, scratch, block_targets, w, lse[rows], scale, 1.0 / temperature)
        if x.dtype != logits.dtype:
            logits[rows] = x


# Any KD divergence D(p_t, p_s) as one per-element function (`divergence_terms`) under one
# statistics -> sums -> gradient path (`kernels.divergences`). With l = log p_s and
# g = dD/dl (l's entries taken as free), the chain rule through l = x/T - lse(x/T) gives
# dD/dx = (g - p_s * sum(g)) / T; only row sums cross the vocabulary (or its shards).


def _to(p: Tensor, q: Tensor, log_ratio: Tensor) -> Tensor:
    """q - p for log_ratio = log(q / p), as p * expm1(log_ratio) where that is the accurate
    form (log_ratio < 1), so that p * log(p / q) + (q - p), a KL term made >= 0 and O(log_ratio^2)
    (its sum over a distribution is the KL: the added q - p sum to 0), does not lose the small
    result to fp32 cancellation between O(log_ratio) terms."""
    return torch.where(log_ratio < 1, p * torch.expm1(log_ratio.clamp(max=1)), q - p)


def divergence_terms(
    divergence: Divergence, beta: float, log_p_s: Tensor, log_p_t: Tensor
) -> tuple[Tensor, Tensor]:
    """(the terms whose sum over the vocabulary is D(p_t, p_s), g = dD/dlog p_s) per element.

    forward_kl: KL(p_t || p_s); reverse_kl: KL(p_s || p_t); jsd: beta KL(p_t || m) +
    (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (TRL's generalized JSD; 0 < beta <
    1); tvd: sum |p_t - p_s| / 2. log_p_s, log_p_t: fp32 [b, V] (columns of a shard allowed).
    """
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    delta = log_p_s - log_p_t
    if divergence == "forward_kl":
        return p_t * -delta + _to(p_t, p_s, delta), -p_t
    if divergence == "reverse_kl":
        return p_s * delta + _to(p_s, p_t, -delta), p_s * (delta + 1)
    if divergence == "jsd":
        # log(m / p_t) = log(beta + (1 - beta) e^delta), with expm1/log1p on either side of 0.
        log_m_t = torch.where(
            delta <= 0,
            torch.log1p((1 - beta) * torch.expm1(delta.clamp(max=0))),
            delta + torch.log1p(beta * torch.expm1(-delta.clamp(min=0))),
        )
        log_s_m = delta - log_m_t  # log(p_s / m)
        m = beta * p_t + (1 - beta) * p_s
        g = (1 - beta) * p_s * log_s_m
        teacher = p_t * -log_m_t + _to(p_t, m, log_m_t)
        return beta * teacher + g + (1 - beta) * _to(p_s, m, -log_s_m), g
    if divergence == "tvd":
        diff = p_s - p_t
        return 0.5 * diff.abs(), 0.5 * diff.sign() * p_s
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _log_probs(x: Tensor, t: Tensor, lse: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """(log p_s, log p_t) of fp32 blocks x, t [b, V] through lse [b, 2] = (lse(x/T), lse(t/T))."""
    return x * inv_t - lse[:, 0:1], t * inv_t - lse[:, 1:2]


def divergence_sums(
    logits: Tensor,
    teacher_logits: Tensor,
    lse: Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
) -> Tensor:
    """Per-row sums over this chunk's columns of D's terms and of g (`divergence_terms`).

    Args: logits, teacher_logits [n, V] (not modified); lse [n, 2] fp32, (lse(x/T), lse(t/T))
    over the whole vocabulary. Returns [n, 2] fp32; summed over the shards of a vocabulary they
    are the rows' D and sum(g).
    """
    sums = torch.empty(logits.shape[0], 2, dtype=torch.float32, device=logits.device)
    for rows in _blocks(*logits.shape):
        log_p = _log_probs(
            logits[rows].float(), teacher_logits[rows].float(), lse[rows], 1 / temperature
        )
        terms, g = divergence_terms(divergence, beta, *log_p)
        sums[rows, 0], sums[rows, 1] = terms.sum(dim=1), g.sum(dim=1)
    return sums


def divergence_grad_(
    logits: Tensor,
    teacher_logits: Tensor,
    lse: Tensor,
    g_sum: Tensor,
    scale: Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
) -> None:
    """teacher_logits [n, V] become scale * (g - p_s * sum(g)) = scale * T * dD/dx per row: with
    scale = kd_weight * row weight * T, the gradient of kd_weight * row weight * T^2 * D.

    Args: logits [n, V] (not modified); lse [n, 2] as in `divergence_sums`; g_sum [n] fp32, the
    rows' sum(g) over the whole vocabulary; scale [n] fp32.
    """
    inv_t = 1.0 / temperature
    for rows in _blocks(*logits.shape):
        log_p_s, log_p_t = _log_probs(
            logits[rows].float(), teacher_logits[rows].float(), lse[rows], inv_t
        )
        g = divergence_terms(divergence, beta, log_p_s, log_p_t)[1]
        grad = g.sub_(log_p_s.exp_().mul_(g_sum[rows, None])).mul_(scale[rows, None])
        teacher_logits[rows] = grad
