"""Triton per-chunk loss kernels: one program per row, two sweeps over V in blocks.

The first sweep keeps an online softmax (running max and rescaled sum of exponentials, as in
flash attention), so a row never has to fit in one block; the second writes the gradient over
the logits in place. Same contracts as `torch_ops.py`. CPU tensors run under TRITON_INTERPRET=1.
"""

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_ops import DIVERGENCES, Divergence, stats_width

# Largest V-block, and logits per thread and tensor on a GPU. 4 K-blocks at 4 logits per thread
# (1024 threads) keep the CE + KD kernel at <= 46 registers of the 64 a 1024-thread block may use,
# on sm_80 and sm_90 (`launch/bench_losses.py --kernel-report`); 16 K-blocks spilled there, and they
# left 30 % of the lanes masked at V = 50,257 (6 % now).
_MAX_BLOCK = 4096
_LOGITS_PER_THREAD = 4


def _launch_config(vocab: int, device: torch.device) -> dict[str, int]:
    """V-block and warps; the GPU config for CUDA tensors and for meta tensors (`aot.py` compiles
    those launches ahead of time), a small one for the CPU interpreter."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    if device.type == "cpu":
        return {"BLOCK": block, "num_warps": 4}
    return {"BLOCK": block, "num_warps": max(1, block // (32 * _LOGITS_PER_THREAD))}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the grid and every argument by name (constexprs and num_warps too)."""

    kernel: triton.JITFunction
    grid: tuple[int]
    args: dict[str, Any]
    num_warps: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, num_warps=self.num_warps)


def _launch(kernel: triton.JITFunction, logits: Tensor, **args: Any) -> Launch:
    """A launch of ``kernel`` with one program per row of logits [n, V]."""
    n, vocab = logits.shape
    config = _launch_config(vocab, logits.device)
    num_warps = config.pop("num_warps")
    return Launch(kernel, (n,), {**args, "V": vocab, **config}, num_warps)


@triton.jit
def _online_lse_step(x, m, s):
    """Folds block x into running max m and sum s of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _weight_sum(weights_ptr, row, K: tl.constexpr):
    """Sum of a row's K target weights."""
    total = 0.0
    for j in tl.static_range(K):
        total += tl.load(weights_ptr + row * K + j)
    return total


@triton.jit
def _weighted_target_logits(x, cols, targets_ptr, weights_ptr, row, K: tl.constexpr):
    """sum_j w_j x[t_j] over the block's columns for the row's K targets."""
    total = 0.0
    for j in tl.static_range(K):
        target = tl.load(targets_ptr + row * K + j)
        total += tl.load(weights_ptr + row * K + j) * tl.sum(tl.where(cols == target, x, 0.0))
    return total


@triton.jit
def _weighted_onehots(cols, targets_ptr, weights_ptr, row, K: tl.constexpr):
    """sum_j w_j onehot(t_j) over the block's columns."""
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for j in tl.static_range(K):
        target = tl.load(targets_ptr + row * K + j)
        total += tl.where(cols == target, tl.load(weights_ptr + row * K + j), 0.0)
    return total


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, stride, targets_ptr, weights_ptr, loss_ptr, V, K: tl.constexpr, BLOCK: tl.constexpr
):
    """sum_j w_j (lse - x[t_j]) over the row's K targets; the logits become its gradient."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    w = _weight_sum(weights_ptr, row, K)

    m = -float("inf")
    s = 0.0
    wx = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m, s = _online_lse_step(x, m, s)
        wx += _weighted_target_logits(x, cols, targets_ptr, weights_ptr, row, K)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, w * lse - wx)

    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = w * tl.exp(x - lse) - _weighted_onehots(cols, targets_ptr, weights_ptr, row, K)
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _kl_div_kernel(
    logits_ptr,
    teacher_ptr,
    stride,
    teacher_stride,
    targets_ptr,
    ce_weights_ptr,
    row_weight_ptr,
    ce_ptr,
    kd_ptr,
    V,
    inv_t,
    temperature,
    kd_weight,
    WITH_CE: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """KL(p_t || p_s) * T^2, plus CE over K targets on the same logits when WITH_CE (gradients
    summed)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    teacher_ptr += row * teacher_stride
    w = tl.load(row_weight_ptr + row)

    # Online sums over scaled logits a = s/T, b = t/T: lse(a), lse(b) and
    # d = sum exp(b - m_b) * (b - a), so that KL = d / s_b - lse(b) + lse(a).
    m_a = -float("inf")
    s_a = 0.0
    m_b = -float("inf")
    s_b = 0.0
    d = 0.0
    if WITH_CE:  # CE needs lse of the unscaled logits too
        m_x = -float("inf")
        s_x = 0.0
        w_ce = _weight_sum(ce_weights_ptr, row, K)
        wx = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        a = tl.where(in_row, x * inv_t, -float("inf"))
        b = tl.where(in_row, t * inv_t, -float("inf"))
        m_a, s_a = _online_lse_step(a, m_a, s_a)
        m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
        e_b = tl.exp(b - m_b_new)  # 0 outside the row
        rescale = tl.exp(m_b - m_b_new)
        s_b = s_b * rescale + tl.sum(e_b, axis=0)
        d = d * rescale + tl.sum(e_b * (t - x), axis=0) * inv_t
        m_b = m_b_new
        if WITH_CE:
            m_x, s_x = _online_lse_step(tl.where(in_row, x, -float("inf")), m_x, s_x)
            wx += _weighted_target_logits(x, cols, targets_ptr, ce_weights_ptr, row, K)
    lse_a = m_a + tl.log(s_a)
    lse_b = m_b + tl.log(s_b)
    tl.store(kd_ptr + row, w * temperature * temperature * (d / s_b - lse_b + lse_a))
    if WITH_CE:
        lse_x = m_x + tl.log(s_x)
        tl.store(ce_ptr + row, w_ce * lse_x - wx)

    kd_scale = w * temperature * kd_weight  # d(T^2 KL)/dx = T * (p_s - p_t)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        b = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
        grad = kd_scale * (tl.exp(x * inv_t - lse_a) - tl.exp(b - lse_b))
        if WITH_CE:
            grad += w_ce * tl.exp(x - lse_x)
            grad -= _weighted_onehots(cols, targets_ptr, ce_weights_ptr, row, K)
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _num_targets(targets: Tensor) -> int:
    """K: one target per row ([n]) or K weighted targets per row ([n, K], mixup's two)."""
    return 1 if targets.dim() == 1 else targets.shape[1]


def cross_entropy_launch(logits: Tensor, targets: Tensor, weights: Tensor, loss: Tensor) -> Launch:
    """The launch of `cross_entropy_`: logits [n, V], targets [n] or [n, K] long, their weights
    of the same shape and loss [n] fp32."""
    return _launch(
        _cross_entropy_kernel,
        logits,
        logits_ptr=logits,
        stride=logits.stride(0),
        targets_ptr=targets.contiguous(),
        weights_ptr=weights.contiguous(),
        loss_ptr=loss,
        K=_num_targets(targets),
    )


def cross_entropy_(logits: Tensor, targets: Tensor, row_weight: Tensor) -> Tensor:
    """Cross-entropy per row; logits [n, V] become dloss/dlogits. See `torch_ops.cross_entropy_`."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    cross_entropy_launch(logits, targets, row_weight, loss)()
    return loss


def kl_div_launch(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    row_weight: Tensor,
    ce: Tensor,
    kd: Tensor,
    temperature: float,
    kd_weight: float,
    *,
    ce_weight: Tensor | None = None,
) -> Launch:
    """The launch of `kl_div_` (targets None) and `cross_entropy_kl_div_`: logits and
    teacher_logits [n, V], targets [n] or [n, K] long with their CE weights ``ce_weight`` (default
    ``row_weight``), row_weight (KD's), ce and kd [n] fp32."""
    with_ce = targets is not None
    ce_weight = row_weight if ce_weight is None else ce_weight
    return _launch(
        _kl_div_kernel,
        logits,
        logits_ptr=logits,
        teacher_ptr=teacher_logits,
        stride=logits.stride(0),
        teacher_stride=teacher_logits.stride(0),
        # Unread placeholders without CE.
        targets_ptr=targets.contiguous() if with_ce else row_weight,
        ce_weights_ptr=ce_weight.contiguous() if with_ce else row_weight,
        row_weight_ptr=row_weight.contiguous(),
        ce_ptr=ce,
        kd_ptr=kd,
        inv_t=1.0 / temperature,
        temperature=float(temperature),
        kd_weight=float(kd_weight),
        WITH_CE=with_ce,
        K=_num_targets(targets) if with_ce else 1,
    )


def _kl_div(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
) -> tuple[Tensor, Tensor]:
    ce = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    kd = torch.empty_like(ce)
    kl_div_launch(
        logits, teacher_logits, targets, row_weight, ce, kd, temperature, kd_weight,
        ce_weight=ce_weight,
    )()  # fmt: skip
    return ce, kd


def kl_div_(
    logits: Tensor, teacher_logits: Tensor, row_weight: Tensor, temperature: float
) -> Tensor:
    """KL * T^2 per row; student logits become the gradient. See `torch_ops.kl_div_`."""
    return _kl_div(logits, teacher_logits, None, None, row_weight, temperature, 1.0)[1]


def cross_entropy_kl_div_(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """CE and KD rows from one logits chunk. See `torch_ops.cross_entropy_kl_div_`."""
    return _kl_div(logits, teacher_logits, targets, ce_weight, row_weight, temperature, kd_weight)


# The vocabulary-parallel split (`torch_ops.shard_stats` / `torch_ops.shard_grad_`): a statistics
# sweep over one shard's logits, the TP group's reduction, then a gradient sweep.


@triton.jit
def _shard_stats_kernel(
    logits_ptr,
    teacher_ptr,
    stride,
    teacher_stride,
    targets_ptr,
    ce_weights_ptr,
    stats_ptr,
    V,
    inv_t,
    WITH_CE: tl.constexpr,
    WITH_KD: tl.constexpr,
    STATS: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """A row's CE statistics (max x, sum exp(x - max x), sum_j w_j x[t_j]) when WITH_CE, then
    its KD statistics (max a, sum exp(a - max a), max b, sum e_b, sum e_b * (b - a)) when WITH_KD;
    targets outside the shard are -1 and match no column."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    teacher_ptr += row * teacher_stride
    stats_ptr += row * STATS
    if WITH_CE:
        m_x = -float("inf")
        s_x = 0.0
        wx = 0.0
    if WITH_KD:
        m_a = -float("inf")
        s_a = 0.0
        m_b = -float("inf")
        s_b = 0.0
        d = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if WITH_CE:
            m_x, s_x = _online_lse_step(tl.where(in_row, x, -float("inf")), m_x, s_x)
            wx += _weighted_target_logits(x, cols, targets_ptr, ce_weights_ptr, row, K)
        if WITH_KD:
            t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            m_a, s_a = _online_lse_step(tl.where(in_row, x * inv_t, -float("inf")), m_a, s_a)
            b = tl.where(in_row, t * inv_t, -float("inf"))
            m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
            e_b = tl.exp(b - m_b_new)  # 0 outside the row
            rescale = tl.exp(m_b - m_b_new)
            s_b = s_b * rescale + tl.sum(e_b, axis=0)
            d = d * rescale + tl.sum(e_b * (t - x), axis=0) * inv_t
            m_b = m_b_new
    if WITH_CE:
        tl.store(stats_ptr, m_x)
        tl.store(stats_ptr + 1, s_x)
        tl.store(stats_ptr + 2, wx)
        stats_ptr += 3
    if WITH_KD:
        tl.store(stats_ptr, m_a)
        tl.store(stats_ptr + 1, s_a)
        tl.store(stats_ptr + 2, m_b)
        tl.store(stats_ptr + 3, s_b)
        tl.store(stats_ptr + 4, d)


@triton.jit
def _shard_grad_kernel(
    logits_ptr,
    teacher_ptr,
    stride,
    teacher_stride,
    targets_ptr,
    ce_weights_ptr,
    lse_ptr,
    kd_scale_ptr,
    V,
    inv_t,
    WITH_CE: tl.constexpr,
    WITH_KD: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The row's logits become sum_j w_j (softmax(x) - onehot(t_j)) when WITH_CE plus
    kd_scale * (softmax(x / T) - softmax(t / T)) when WITH_KD, from the global lse (x, x/T, t/T)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    teacher_ptr += row * teacher_stride
    if WITH_CE:
        lse_x = tl.load(lse_ptr + row * 3)
        w_ce = _weight_sum(ce_weights_ptr, row, K)
    if WITH_KD:
        lse_a = tl.load(lse_ptr + row * 3 + 1)
        lse_b = tl.load(lse_ptr + row * 3 + 2)
        kd_scale = tl.load(kd_scale_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if WITH_KD:
            b = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
            grad += kd_scale * (tl.exp(x * inv_t - lse_a) - tl.exp(b - lse_b))
        if WITH_CE:
            grad += w_ce * tl.exp(x - lse_x)
            grad -= _weighted_onehots(cols, targets_ptr, ce_weights_ptr, row, K)
        tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _shard_args(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    teacher_logits: Tensor | None,
    placeholder: Tensor,
) -> dict[str, Any]:
    """The arguments both split kernels share; unread placeholders for what is absent."""
    with_ce, with_kd = targets is not None, teacher_logits is not None
    teacher = teacher_logits if with_kd else logits
    return {
        "logits_ptr": logits,
        "teacher_ptr": teacher,
        "stride": logits.stride(0),
        "teacher_stride": teacher.stride(0),
        "targets_ptr": targets.contiguous() if with_ce else placeholder,
        "ce_weights_ptr": ce_weight.contiguous() if with_ce else placeholder,
        "WITH_CE": with_ce,
        "WITH_KD": with_kd,
        "K": _num_targets(targets) if with_ce else 1,
    }


def shard_stats_launch(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    teacher_logits: Tensor | None,
    stats: Tensor,
    temperature: float,
) -> Launch:
    """The launch of `shard_stats` into stats [n, stats_width(...)] fp32 (contiguous)."""
    return _launch(
        _shard_stats_kernel,
        logits,
        **_shard_args(logits, targets, ce_weight, teacher_logits, stats),
        stats_ptr=stats,
        inv_t=1.0 / temperature,
        STATS=stats.shape[1],
    )


def shard_stats(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-row statistics of one vocabulary shard's logits chunk. See `torch_ops.shard_stats`."""
    width = stats_width(targets is not None, teacher_logits is not None)
    stats = torch.empty(logits.shape[0], width, dtype=torch.float32, device=logits.device)
    shard_stats_launch(logits, targets, ce_weight, teacher_logits, stats, temperature)()
    return stats


def shard_grad_launch(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    lse: Tensor,
    teacher_logits: Tensor | None,
    kd_scale: Tensor | None,
    temperature: float,
) -> Launch:
    """The launch of `shard_grad_`: lse [n, 3] fp32 (contiguous), kd_scale [n] fp32 or None."""
    return _launch(
        _shard_grad_kernel,
        logits,
        **_shard_args(logits, targets, ce_weight, teacher_logits, lse),
        lse_ptr=lse,
        kd_scale_ptr=lse if kd_scale is None else kd_scale.contiguous(),
        inv_t=1.0 / temperature,
    )


def shard_grad_(
    logits: Tensor,
    targets: Tensor | None,
    ce_weight: Tensor | None,
    lse: Tensor,
    teacher_logits: Tensor | None = None,
    kd_scale: Tensor | None = None,
    temperature: float = 1.0,
) -> None:
    """One shard's logits [n, V] become their gradient. See `torch_ops.shard_grad_`."""
    shard_grad_launch(logits, targets, ce_weight, lse, teacher_logits, kd_scale, temperature)()


# Any KD divergence (`torch_ops.divergence_terms`, `divergences.divergence_chunk_`): the sums
# sweep and the gradient sweep, the divergence a compile-time switch.
_DIVERGENCE_ID = {name: i for i, name in enumerate(DIVERGENCES)}


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate near 0 (its Taylor series below 0.05 in magnitude: terms past x^4
    are < 1e-7 of the result)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < 0.05, series, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y):
    """log(1 + y), accurate near 0 (its series below 0.05 in magnitude)."""
    series = y * (1.0 - y * (0.5 - y * (1.0 / 3.0 - y * (0.25 - y * (0.2 - y / 6.0)))))
    return tl.where(tl.abs(y) < 0.05, series, tl.log(1.0 + y))


@triton.jit
def _to(p, q, log_ratio):
    """q - p for log_ratio = log(q / p). See `torch_ops._to`."""
    return tl.where(log_ratio < 1.0, p * _expm1(tl.minimum(log_ratio, 1.0)), q - p)


@triton.jit
def _divergence_terms(log_p_s, log_p_t, beta, DIVERGENCE: tl.constexpr):
    """(D's terms, g = dD/dlog p_s) per element; DIVERGENCE indexes `torch_ops.DIVERGENCES`.
    The same algebra as `torch_ops.divergence_terms`."""
    p_s = tl.exp(log_p_s)
    p_t = tl.exp(log_p_t)
    delta = log_p_s - log_p_t
    if DIVERGENCE == 0:  # forward_kl
        terms = -p_t * delta + _to(p_t, p_s, delta)
        g = -p_t
    elif DIVERGENCE == 1:  # reverse_kl
        terms = p_s * delta + _to(p_s, p_t, -delta)
        g = p_s * (delta + 1.0)
    elif DIVERGENCE == 2:  # jsd
        below = _log1p((1.0 - beta) * _expm1(tl.minimum(delta, 0.0)))
        above = delta + _log1p(beta * _expm1(-tl.maximum(delta, 0.0)))
        log_m_t = tl.where(delta <= 0.0, below, above)
        log_s_m = delta - log_m_t
        m = beta * p_t + (1.0 - beta) * p_s
        g = (1.0 - beta) * p_s * log_s_m
        teacher = -p_t * log_m_t + _to(p_t, m, log_m_t)
        terms = beta * teacher + g + (1.0 - beta) * _to(p_s, m, -log_s_m)
    else:  # tvd
        diff = p_s - p_t
        terms = 0.5 * tl.abs(diff)
        g = tl.where(diff > 0, 0.5 * p_s, tl.where(diff < 0, -0.5 * p_s, 0.0))
    return terms, g


@triton.jit
def _divergence_sums_kernel(
    logits_ptr,
    teacher_ptr,
    stride,
    teacher_stride,
    lse_ptr,
    sums_ptr,
    V,
    inv_t,
    beta,
    DIVERGENCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The row's sums of D's terms and of g over its V columns, from lse (x/T, t/T)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    teacher_ptr += row * teacher_stride
    lse_s = tl.load(lse_ptr + row * 2)
    lse_t = tl.load(lse_ptr + row * 2 + 1)
    total = 0.0
    g_total = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        terms, g = _divergence_terms(x * inv_t - lse_s, t * inv_t - lse_t, beta, DIVERGENCE)
        total += tl.sum(tl.where(in_row, terms, 0.0), axis=0)
        g_total += tl.sum(tl.where(in_row, g, 0.0), axis=0)
    tl.store(sums_ptr + row * 2, total)
    tl.store(sums_ptr + row * 2 + 1, g_total)


@triton.jit
def _divergence_grad_kernel(
    logits_ptr,
    teacher_ptr,
    stride,
    teacher_stride,
    lse_ptr,
    g_sum_ptr,
    scale_ptr,
    V,
    inv_t,
    beta,
    DIVERGENCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The row's teacher logits become scale * (g - p_s * sum(g))."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    teacher_ptr += row * teacher_stride
    lse_s = tl.load(lse_ptr + row * 2)
    lse_t = tl.load(lse_ptr + row * 2 + 1)
    g_sum = tl.load(g_sum_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(logits_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        log_p_s = x * inv_t - lse_s
        g = _divergence_terms(log_p_s, t * inv_t - lse_t, beta, DIVERGENCE)[1]
        grad = scale * (g - tl.exp(log_p_s) * g_sum)
        tl.store(teacher_ptr + cols, grad.to(teacher_ptr.dtype.element_ty), mask=in_row)


def _divergence_args(
    logits: Tensor, teacher_logits: Tensor, lse: Tensor, temperature: float,
    divergence: Divergence, beta: float,
) -> dict[str, Any]:  # fmt: skip
    return {
        "logits_ptr": logits,
        "teacher_ptr": teacher_logits,
        "stride": logits.stride(0),
        "teacher_stride": teacher_logits.stride(0),
        "lse_ptr": lse.contiguous(),
        "inv_t": 1.0 / temperature,
        "beta": beta,
        "DIVERGENCE": _DIVERGENCE_ID[divergence],
    }


def divergence_sums_launch(
    logits: Tensor, teacher_logits: Tensor, lse: Tensor, sums: Tensor, temperature: float,
    divergence: Divergence, beta: float,
) -> Launch:  # fmt: skip
    """The launch of `divergence_sums` into sums [n, 2] fp32 (contiguous)."""
    args = _divergence_args(logits, teacher_logits, lse, temperature, divergence, beta)
    return _launch(_divergence_sums_kernel, logits, **args, sums_ptr=sums)


def divergence_sums(
    logits: Tensor,
    teacher_logits: Tensor,
    lse: Tensor,
    temperature: float,
    divergence: Divergence,
    beta: float,
) -> Tensor:
    """Per-row sums of D's terms and of g. See `torch_ops.divergence_sums`."""
    sums = torch.empty(logits.shape[0], 2, dtype=torch.float32, device=logits.device)
    divergence_sums_launch(logits, teacher_logits, lse, sums, temperature, divergence, beta)()
    return sums


def divergence_grad_launch(
    logits: Tensor, teacher_logits: Tensor, lse: Tensor, g_sum: Tensor, scale: Tensor,
    temperature: float, divergence: Divergence, beta: float,
) -> Launch:  # fmt: skip
    """The launch of `divergence_grad_`: g_sum, scale [n] fp32."""
    args = _divergence_args(logits, teacher_logits, lse, temperature, divergence, beta)
    return _launch(
        _divergence_grad_kernel,
        logits,
        **args,
        g_sum_ptr=g_sum.contiguous(),
        scale_ptr=scale.contiguous(),
    )


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
    """Teacher logits become the KD gradient. See `torch_ops.divergence_grad_`."""
    divergence_grad_launch(
        logits, teacher_logits, lse, g_sum, scale, temperature, divergence, beta
    )()
