"""The training objectives of docs/design.md, each in a fused form and a plain full-logits form.

- CE: next-token cross-entropy, mean over tokens.
- KD: KL(softmax(z_t / T) || softmax(z_s / T)) * T^2, mean over tokens.
- D_TED = mean_k MSE(N(g_t^k(H_t^{M(k)})), N(g_s^k(H_s^k))), N a LayerNorm without its affine
  map (``normalized``); LWD's D_layer is mean_k MSE(H_t^{M(k)}, W^k H_s^k) on the raw
  states; TED-KL replaces each MSE by KD between the filters' predictions through the Stage I head.
  ``combine_layers`` averages over k (the authors' code) or sums (Eq. 6).
- CR-ILD: on a mixup input, CE is lambda * CE(y) + (1 - lambda) * CE(y_rev) (``labels2``, ``mix``);
  attention relations compare two attention distributions over the causal keys (``attention_kl``).

Tokens whose label is ``IGNORE_INDEX`` count for neither CE nor KD. All loss math is fp32. A head
weight sharded by vocabulary (tensor parallelism) goes to the vocabulary-parallel fused losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ted_scale.data.loader import IGNORE_INDEX
from ted_scale.kernels import fused_linear_ce_kd, fused_linear_cross_entropy, fused_linear_kl_div
from ted_scale.parallel.tensor import vocab_shard_of

Reduction = Literal["mean", "sum"]


def cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    *,
    fused: bool,
    labels2: Tensor | None = None,
    mix: float = 1.0,
) -> Tensor:
    """Mean CE of ``hidden`` [B, T, d] (already final-normed) through ``head_weight`` [V, d].

    With ``labels2`` [B, T]: mix * CE(labels) + (1 - mix) * CE(labels2) from the same logits.
    """
    if fused:
        return fused_linear_cross_entropy(
            hidden,
            head_weight,
            labels,
            ignore_index=IGNORE_INDEX,
            targets2=labels2,
            mix=mix,
            shard=vocab_shard_of(head_weight),
        )
    logits = F.linear(hidden, head_weight).float().flatten(0, -2)
    ce = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)
    if labels2 is None:
        return ce
    ce2 = F.cross_entropy(logits, labels2.flatten(), ignore_index=IGNORE_INDEX)
    return mix * ce + (1.0 - mix) * ce2


def kl_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    fused: bool,
) -> Tensor:
    """KD between two heads' predictions, mean over tokens with a label: the KD and TED-KL term.

    student_hidden [B, T, ds] with student_weight [V, ds]; teacher_hidden [B, T, dt] with
    teacher_weight [V, dt]; both hidden states already final-normed.
    """
    keep = labels != IGNORE_INDEX
    if fused:
        return fused_linear_kl_div(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            temperature=temperature,
            mask=keep,
            shard=vocab_shard_of(student_weight),
        )
    z_s = F.linear(student_hidden, student_weight).float()[keep]
    z_t = F.linear(teacher_hidden, teacher_weight).float()[keep]
    return _kl_from_logits(z_s, z_t, temperature)


def cross_entropy_and_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    temperature: float,
    alpha_kd: float,
    fused: bool,
    labels2: Tensor | None = None,
    mix: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE + alpha_kd * KD sharing the student's logits; returns (loss, ce, kd), ce/kd detached.

    With ``labels2``, CE is the mixed one of ``cross_entropy``; KD stays over ``labels``' tokens.
    """
    if fused:
        return fused_linear_ce_kd(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden,
            teacher_weight,
            temperature=temperature,
            kd_weight=alpha_kd,
            ignore_index=IGNORE_INDEX,
            targets2=labels2,
            mix=mix,
            shard=vocab_shard_of(student_weight),
        )
    z_s = F.linear(student_hidden, student_weight).float()
    keep = labels != IGNORE_INDEX
    ce = F.cross_entropy(z_s.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)
    if labels2 is not None:
        ce2 = F.cross_entropy(z_s.flatten(0, -2), labels2.flatten(), ignore_index=IGNORE_INDEX)
        ce = mix * ce + (1.0 - mix) * ce2
    z_t = F.linear(teacher_hidden, teacher_weight).float()
    kd = _kl_from_logits(z_s[keep], z_t[keep], temperature)
    return ce + alpha_kd * kd, ce.detach(), kd.detach()


def _kl_from_logits(z_s: Tensor, z_t: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, mean over rows of [N, V] logits."""
    if z_s.shape[0] == 0:
        return z_s.sum() * 0.0
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / z_s.shape[0]
    return kl * temperature**2


def mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over tokens and dims of (student - teacher)^2, in fp32.

    Written out rather than ``F.mse_loss`` so that ``teacher`` may be an inference-mode tensor:
    the subtraction saves nothing of it for the backward pass.
    """
    return (student.float() - teacher.float()).square().mean()


def normalized(hidden: Tensor) -> Tensor:
    """``hidden`` [..., d] centred and scaled to unit variance per token, in fp32: a LayerNorm
    without its affine map, blind to the scale and offset of ``hidden``. Its eps (1e-12) only
    guards a constant row: a head's own eps (1e-5) would still see the scale of outputs whose
    variance is near it, as untrained MLP filters' can be."""
    return F.layer_norm(hidden.float(), hidden.shape[-1:], eps=1e-12)


def mse_distance(
    student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]
) -> list[Tensor]:
    """Per-layer ``mse`` between matched states: D_TED's and LWD's layer terms."""
    return [mse(s, t) for s, t in zip(student_states, teacher_states, strict=True)]


def attention_kl(student_log_probs: Tensor, target_log_probs: Tensor) -> Tensor:
    """KL(target || student) between attention distributions over the causal keys, summed over
    keys and averaged over batch, heads and query positions, in fp32.

    Both are log-probabilities [B, n_head, T, T] with -inf above the diagonal (``GPT``'s
    ``attention_log_probs``); ``target_log_probs`` may be an inference-mode tensor.
    """
    T = student_log_probs.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=student_log_probs.device).tril()
    log_s = student_log_probs.float().masked_fill(~causal, 0.0)
    log_t = target_log_probs.float().masked_fill(~causal, 0.0)
    kl = log_t.exp().masked_fill(~causal, 0.0) * (log_t - log_s)
    return kl.sum(dim=-1).mean()


def combine_layers(per_layer: Sequence[Tensor], reduction: Reduction) -> Tensor:
    """K per-layer scalars -> their mean (``mean``) or sum (``sum``)."""
    total = torch.stack(list(per_layer)).sum()
    return total / len(per_layer) if reduction == "mean" else total
