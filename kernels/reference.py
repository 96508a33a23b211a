"""PyTorch per-chunk loss arithmetic: the CPU path and the oracle for the Triton kernels.

Every function takes one chunk of logits [n, V] (any float dtype), computes in fp32, returns
per-row losses already multiplied by `row_weight` [n] (fp32; 0 drops a row, 1/count makes the
sum a mean), and overwrites the student logits in place with d(sum of returned rows)/d(logits),
so the caller never holds a second [n, V] buffer (teacher logits may be clobbered as scratch).
Targets must lie in [0, V): callers replace ignored targets by 0 and give those rows weight 0.
`triton_ops` has the same functions.
"""

import torch
from torch import Tensor


def _cross_entropy_(x: Tensor, targets: Tensor, row_weight: Tensor) -> Tensor:
    """CE rows of fp32 logits x [n, V]; overwrites x with their gradient."""
    lse = torch.logsumexp(x, dim=-1)
    loss = row_weight * (lse - x.gather(1, targets[:, None]).squeeze(1))
    x.sub_(lse[:, None]).exp_()
    x.scatter_add_(1, targets[:, None], x.new_full((x.shape[0], 1), -1.0))
    x.mul_(row_weight[:, None])
    return loss


def _kl_div(
    x: Tensor, teacher_logits: Tensor, row_weight: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """KL(p_t || p_s) * T^2 rows and their gradient w.r.t. fp32 student logits x (kept intact).

    teacher_logits serve as scratch: in place ops keep the live [n, V] buffers to four.
    """
    log_ps = x / temperature
    log_ps -= torch.logsumexp(log_ps, dim=-1, keepdim=True)
    log_pt = teacher_logits.float().div_(temperature)
    log_pt -= torch.logsumexp(log_pt, dim=-1, keepdim=True)
    p_t = log_pt.exp()
    loss = row_weight * temperature**2 * log_pt.sub_(log_ps).mul_(p_t).sum(-1)
    # d(T^2 KL)/dz_s = T * (p_s - p_t)
    grad = log_ps.exp_().sub_(p_t).mul_((row_weight * temperature)[:, None])
    return loss, grad


def _write_back_(logits: Tensor, x: Tensor) -> None:
    if x is not logits:
        logits.copy_(x)


def cross_entropy_(logits: Tensor, targets: Tensor, row_weight: Tensor) -> Tensor:
    """Cross-entropy per row; logits [n, V] become dloss/dlogits.

    Args: logits [n, V]; targets [n] long in [0, V); row_weight [n] fp32. Returns [n] fp32.
    """
    x = logits.float()  # the same tensor when logits are fp32: computed in place
    loss = _cross_entropy_(x, targets, row_weight)
    _write_back_(logits, x)
    return loss


def kl_div_(
    logits: Tensor, teacher_logits: Tensor, row_weight: Tensor, temperature: float
) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 per row; student logits [n, V] become the gradient.

    Args: logits, teacher_logits [n, V]; row_weight [n] fp32. Returns [n] fp32.
    """
    loss, grad = _kl_div(logits.float(), teacher_logits, row_weight, temperature)
    logits.copy_(grad)
    return loss


def cross_entropy_kl_div_(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
) -> tuple[Tensor, Tensor]:
    """CE and KD rows from one student logits chunk; logits become d(CE + kd_weight*KD)/dlogits.

    Args: logits, teacher_logits [n, V]; targets [n] long in [0, V); row_weight [n] fp32 (shared by
    both terms). Returns (ce [n], kd [n]) fp32.
    """
    x = logits.float()
    kd, kd_grad = _kl_div(x, teacher_logits, row_weight, temperature)
    ce = _cross_entropy_(x, targets, row_weight)
    x.add_(kd_grad, alpha=kd_weight)
    _write_back_(logits, x)
    return ce, kd
