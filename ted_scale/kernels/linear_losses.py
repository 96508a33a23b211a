"""Chunked fused linear losses: LM-head matmul + CE / KD without materialising [N, V] logits.

One autograd Function (`_FusedLinearLoss`) owns what every loss shares: it walks the rows in
chunks, logits = h_chunk @ W.T, a per-chunk op turns them into per-row losses and overwrites them
with dloss/dlogits, and two matmuls fold that into grad_hidden[chunk] and grad_weight. Gradients
are thus finished in the forward pass (as in Liger-Kernel); backward only scales them by
grad_output. The per-chunk op (`_chunk_op`) is CE, KD or both, from `triton_ops` (CUDA), `cpu_ops`
(CPU) or `torch_ops` (anywhere):
the default forward KL fused with CE in one sweep, any other divergence through
`divergences.divergence_chunk_`. Peak extra memory is one logits chunk (two with a teacher, plus
the chunk op's fp32 temporaries on the torch path), grad_hidden, and an fp32 grad_weight
accumulator when the weight is trained.

Matmuls run in the hidden states' dtype (a weight of another dtype is cast once); losses are
accumulated in fp32 and returned as fp32 scalars; gradients come back in the inputs' dtypes.

With a `VocabShard` the weights are one rank's vocabulary rows: the chunk ops reduce their
statistics over the tensor-parallel group (`vocab_parallel.shard_chunk_`, `divergences`) and
grad_hidden is summed over it, so it is the full gradient of the replicated hidden states.
"""

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import cpu_ops, torch_ops
from .divergences import divergence_chunk_
from .torch_ops import DIVERGENCES, Divergence
from .vocab_parallel import VocabShard, shard_chunk_

# Default chunk: the largest power-of-two row count whose logits hold <= 2^24 elements
# (256 rows for GPT-2's V = 50,257: 51 MB in fp32). Big enough to keep the matmuls efficient,
# small enough that the chunk and its temporaries stay far below the [N, V] logits.
CHUNK_ELEMENTS = 2**24

Backend = Literal["auto", "triton", "cpu", "torch"]


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: the largest power of two with rows * vocab_size <= CHUNK_ELEMENTS."""
    rows = max(1, CHUNK_ELEMENTS // vocab_size)
    return 1 << (rows.bit_length() - 1)


def _chunk_ops(backend: Backend, device: torch.device) -> ModuleType:
    """The per-chunk op module: "auto" takes Triton on CUDA (when installed) and the C++ kernels
    on CPU (when they build), else torch ops; the others force one."""
    if backend == "torch":
        return torch_ops
    if backend == "cpu":
        cpu_ops.extension()  # a forced backend that cannot run says why
        return cpu_ops
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto', 'triton', 'cpu' or 'torch', got {backend!r}")
    if backend == "auto" and device.type != "cuda":
        return cpu_ops if device.type == "cpu" and cpu_ops.available() else torch_ops
    try:
        from . import triton_ops
    except ImportError:
        if backend == "triton":
            raise
        return torch_ops
    return triton_ops


def _mean_weights(keep: Tensor) -> Tensor:
    """fp32 row weights that turn a sum over kept rows into their mean (all 0 if none kept)."""
    keep = keep.float()
    return keep / keep.sum().clamp(min=1.0)


def _ce_targets(
    targets: Tensor, targets2: Tensor | None, mix: float, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(targets [N] or [N, 2] in [0, V), their CE weights of the same shape, the mean weights
    of the first targets' kept rows [N]). With targets2: weights mix and 1 - mix, each target's
    CE a mean over its own kept rows."""
    keep = targets != ignore_index
    row_weight = _mean_weights(keep)
    safe = targets.long().masked_fill(~keep, 0)
    if targets2 is None:
        return safe, row_weight, row_weight
    keep2 = targets2 != ignore_index
    safe2 = targets2.long().masked_fill(~keep2, 0)
    weights = torch.stack([mix * row_weight, (1.0 - mix) * _mean_weights(keep2)], dim=1)
    return torch.stack([safe, safe2], dim=1), weights, row_weight


ChunkOp = Callable[[slice, Tensor, Tensor | None], None]


def _chunked_linear_grads(
    hidden: Tensor,
    weight: Tensor,
    chunk_size: int,
    chunk_op: ChunkOp,
    teacher: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor | None]:
    """Runs chunk_op(rows, logits, teacher_logits) on each chunk of hidden [N, d] @ weight.T [d, V].

    teacher_logits are teacher_hidden[rows] @ teacher_weight.T for teacher = (teacher_hidden,
    teacher_weight), else None. chunk_op must overwrite logits [n, V] with dloss/dlogits. Returns
    (grad_hidden [N, d], grad_weight [V, d] or None when the weight needs no gradient).
    """
    compute_weight = weight.to(hidden.dtype)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = None
    if weight.requires_grad:  # written by the first chunk, accumulated into by the others
        empty = torch.zeros if hidden.shape[0] == 0 else torch.empty
        grad_weight = empty(weight.shape, dtype=torch.float32, device=weight.device)
    # Every chunk's logits go to the same buffers: on CPU a fresh [chunk, V] tensor per chunk is
    # handed back to the OS when freed and page-faulted in again, ~20% on top of its matmul.
    buffer_shape = (min(chunk_size, hidden.shape[0]), weight.shape[0])
    logits_buffer = torch.empty(buffer_shape, dtype=hidden.dtype, device=hidden.device)
    if teacher is not None:
        teacher_hidden, teacher_weight = teacher
        teacher_buffer = torch.empty(buffer_shape, dtype=teacher_hidden.dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        logits = torch.mm(h, compute_weight.T, out=logits_buffer[: h.shape[0]])
        teacher_logits = None
        if teacher is not None:
            teacher_logits = torch.mm(
                teacher_hidden[rows], teacher_weight.T, out=teacher_buffer[: h.shape[0]]
            )
        chunk_op(rows, logits, teacher_logits)
        torch.mm(logits, compute_weight, out=grad_hidden[rows])
        if grad_weight is None:
            continue
        if logits.dtype == torch.float32:
            if start == 0:
                torch.mm(logits.T, h, out=grad_weight)
            else:
                grad_weight.addmm_(logits.T, h)
        elif start == 0:  # a low-precision matmul, accumulated across chunks in fp32
            grad_weight.copy_(logits.T @ h)
        else:
            grad_weight.add_(logits.T @ h)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


@dataclass(frozen=True)
class _Terms:
    """What one fused pass computes besides the student's head: CE over targets (None: no CE)
    and KD against a teacher head (teacher_hidden None: no KD), as rows of fp32 weights."""

    targets: Tensor | None  # [N] or [N, k], ids in [0, V)
    ce_weight: Tensor | None  # the same shape, fp32
    teacher_hidden: Tensor | None  # [N, dt]
    teacher_weight: Tensor | None  # [V, dt]
    kd_row_weight: Tensor | None  # [N] fp32
    temperature: float = 1.0
    kd_weight: float = 1.0
    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    chunk_size: int | None = None
    backend: Backend = "auto"
    shard: VocabShard | None = None


def _chunk_op(terms: _Terms, ops: ModuleType, ce_rows: Tensor, kd_rows: Tensor) -> ChunkOp:
    """The per-chunk op of ``terms``: fills ce_rows / kd_rows and overwrites the logits with
    d(CE + kd_weight * KD)/dlogits. Forward KL runs fused with CE in one sweep; any other
    divergence writes its gradient over the teacher logits (`divergences`), added after CE's."""
    shard, with_ce = terms.shard, terms.targets is not None

    def cross_entropy_(rows: slice, logits: Tensor) -> None:
        targets, weight = terms.targets[rows], terms.ce_weight[rows]
        if shard is None:
            ce_rows[rows] = ops.cross_entropy_(logits, targets, weight)
        else:
            ce_rows[rows] = shard_chunk_(ops, shard, logits, targets, weight)[0]

    def forward_kl_(rows: slice, logits: Tensor, teacher_logits: Tensor) -> None:
        row_weight, temperature = terms.kd_row_weight[rows], terms.temperature
        if shard is not None:
            targets = terms.targets[rows] if with_ce else None
            ce_weight = terms.ce_weight[rows] if with_ce else None
            ce, kd_rows[rows] = shard_chunk_(
                ops, shard, logits, targets, ce_weight, teacher_logits, row_weight, temperature,
                terms.kd_weight,
            )  # fmt: skip
            if with_ce:
                ce_rows[rows] = ce
        elif with_ce:
            ce_rows[rows], kd_rows[rows] = ops.cross_entropy_kl_div_(
                logits, teacher_logits, terms.targets[rows], row_weight, temperature,
                terms.kd_weight, terms.ce_weight[rows],
            )  # fmt: skip
        else:
            kd_rows[rows] = ops.kl_div_(logits, teacher_logits, row_weight, temperature)

    def chunk_op(rows: slice, logits: Tensor, teacher_logits: Tensor | None) -> None:
        if teacher_logits is None:
            cross_entropy_(rows, logits)
        elif terms.divergence == "forward_kl":
            forward_kl_(rows, logits, teacher_logits)
        else:
            kd_rows[rows] = divergence_chunk_(
                ops, logits, teacher_logits, terms.kd_row_weight[rows], terms.temperature,
                terms.divergence, terms.beta, terms.kd_weight, shard,
            )  # fmt: skip
            if with_ce:
                cross_entropy_(rows, logits)
                logits.add_(teacher_logits)
            else:
                logits.copy_(teacher_logits)

    return chunk_op


class _FusedLinearLoss(torch.autograd.Function):
    """CE + kd_weight * KD of hidden @ weight.T, gradients finished in forward (chunk by chunk)
    and only scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, terms: _Terms):
        ops = _chunk_ops(terms.backend, hidden.device)
        n = hidden.shape[0]
        ce_rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        kd_rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        teacher = None
        if terms.teacher_hidden is not None:
            teacher = (terms.teacher_hidden, terms.teacher_weight.to(terms.teacher_hidden.dtype))
        chunk_size = terms.chunk_size or default_chunk_size(weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight = _chunked_linear_grads(
                hidden, weight, chunk_size, _chunk_op(terms, ops, ce_rows, kd_rows), teacher
            )
        if terms.shard is not None:
            dist.all_reduce(grad_hidden, group=terms.shard.group)
        # Kept on ctx rather than saved: backward scales them in place, a [V, d] tensor a step
        # that need not be allocated (and, on CPU, page-faulted in) again.
        ctx.grads = grad_hidden, grad_weight
        ce, kd = ce_rows.sum(), kd_rows.sum()
        ctx.mark_non_differentiable(ce, kd)
        if terms.targets is None:
            loss = kd_rows.sum()
        elif terms.teacher_hidden is None:
            loss = ce_rows.sum()
        else:
            loss = ce + terms.kd_weight * kd
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_ce: Tensor, grad_kd: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "a fused linear loss is back-propagated once: its gradients are computed in the "
                "forward pass and scaled in place by the first backward (retain_graph is not "
                "supported)"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden.mul_(grad_loss), grad_weight, None


def _rows(hidden: Tensor) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def _check_tokens(hidden: Tensor, *per_token: Tensor | None) -> None:
    """Raises unless every per-token tensor has one value per row of hidden [..., d]."""
    n = hidden.shape[:-1].numel()
    for t in per_token:
        if t is not None and t.numel() != n:
            raise ValueError(f"expected {n} per-token values to match hidden {tuple(hidden.shape)}")


def _check_divergence(divergence: Divergence, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1, got {beta!r} (at 0 and 1 it vanishes: use forward_kl or "
            "reverse_kl)"
        )


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1)


def _check_heads(student_weight: Tensor, teacher_weight: Tensor) -> None:
    """Raises unless both heads have one row per vocabulary id (of the same shard)."""
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} vocabulary rows, student_weight "
            f"{student_weight.shape[0]}: both heads must cover the same (shard of the) vocabulary"
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    targets2: Tensor | None = None,
    mix: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    shard: VocabShard | None = None,
) -> Tensor:
    """Mean cross-entropy of hidden @ weight.T over targets != ignore_index, chunked.

    Args:
        hidden: [..., d] hidden states (e.g. after the final LayerNorm).
        weight: [V, d] LM-head weight; gets a gradient when it requires one.
        targets: [...] long next-token ids, ignore_index where no loss applies.
        targets2: [...] a second set of targets (mixup's partner): the loss becomes
            mix * CE(targets) + (1 - mix) * CE(targets2), each a mean over its kept tokens, from
            the same logits.
        chunk_size: rows per logits chunk (default `default_chunk_size(V)`).
        backend: "auto" (Triton for CUDA tensors, C++ for CPU ones), "triton", "cpu" or "torch"
            per-chunk ops.
        shard: weight is this rank's vocabulary rows (`VocabShard`): the loss over the whole
            (unpadded) vocabulary, the same on every rank of shard.group, without full-vocabulary
            logits; grad_hidden is the full gradient (summed over the group), weight's gradient
            this shard's (0 on padding rows).
    Returns: fp32 scalar; 0 with zero gradients when no target is kept.
    """
    _check_tokens(hidden, targets, targets2)
    safe_targets, ce_weight, _ = _ce_targets(
        targets.reshape(-1), _flat(targets2), mix, ignore_index
    )
    terms = _Terms(
        safe_targets, ce_weight, None, None, None,
        chunk_size=chunk_size, backend=backend, shard=shard,
    )  # fmt: skip
    return _FusedLinearLoss.apply(_rows(hidden), weight, terms)[0]


def fused_linear_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    temperature: float,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    shard: VocabShard | None = None,
) -> Tensor:
    """Mean over (masked) tokens of T^2 * D(softmax(z_t/T), softmax(z_s/T)), chunked.

    z_s = student_hidden @ student_weight.T, z_t = teacher_hidden @ teacher_weight.T; D is
    ``divergence`` (`torch_ops.divergence_terms`: forward_kl = KL(p_t || p_s), reverse_kl,
    jsd with ``beta``, tvd).

    Args:
        student_hidden: [..., ds]; student_weight: [V, ds] (gradient when it requires one).
        teacher_hidden: [..., dt]; teacher_weight: [V, dt]. No gradient; may be inference tensors
            and of another dtype than the student.
        mask: [...] bool, tokens to average over (default: all).
        shard: both weights are this rank's vocabulary rows (`VocabShard`): the loss over the whole
            (unpadded) vocabulary, the same on every rank of shard.group, without full-vocabulary
            logits; grad_hidden is the full gradient (summed over the group), weight's gradient
            this shard's (0 on padding rows).
    Returns: fp32 scalar; 0 with zero gradients when the mask keeps nothing.
    """
    _check_tokens(student_hidden, teacher_hidden[..., 0], mask)
    _check_heads(student_weight, teacher_weight)
    _check_divergence(divergence, beta)
    n = student_hidden.shape[:-1].numel()
    keep = torch.ones(n, dtype=torch.bool, device=student_hidden.device) if mask is None else mask
    terms = _Terms(
        None, None, _rows(teacher_hidden), teacher_weight, _mean_weights(keep.reshape(-1)),
        temperature, 1.0, divergence, beta, chunk_size, backend, shard,
    )  # fmt: skip
    return _FusedLinearLoss.apply(_rows(student_hidden), student_weight, terms)[0]


def fused_linear_ce_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    targets2: Tensor | None = None,
    mix: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    shard: VocabShard | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stage II's CE + kd_weight * KD with one student logits matmul per chunk.

    Both terms are means over the tokens whose target != ignore_index (KD skips ignored tokens
    too). With targets2, CE is mix * CE(targets) + (1 - mix) * CE(targets2) as in
    `fused_linear_cross_entropy` (KD still over the first targets' tokens). KD, shapes and shard
    (student and teacher weights split alike) as in `fused_linear_cross_entropy` and
    `fused_linear_kd`.

    Returns: (loss, ce, kd) fp32 scalars; only loss is differentiable.
    """
    _check_tokens(student_hidden, targets, teacher_hidden[..., 0], targets2)
    _check_heads(student_weight, teacher_weight)
    _check_divergence(divergence, beta)
    # KD averages over the rows the (first) targets keep.
    safe_targets, ce_weight, row_weight = _ce_targets(
        targets.reshape(-1), _flat(targets2), mix, ignore_index
    )
    terms = _Terms(
        safe_targets, ce_weight, _rows(teacher_hidden), teacher_weight, row_weight, temperature,
        kd_weight, divergence, beta, chunk_size, backend, shard,
    )  # fmt: skip
    return _FusedLinearLoss.apply(_rows(student_hidden), student_weight, terms)
