"""The training objectives of docs/design.md, each in a fused form and a plain full-logits form.

- CE: next-token cross-entropy, mean over tokens.
- KD: T^2 * D(softmax(z_t / T), softmax(z_s / T)), mean over tokens; D is KL(p_t || p_s) by
  default (``distill.divergence``: reverse KL, JSD(beta), TVD).
- D_TED = mean_k MSE(N(g_t^k(H_t^{M(k)})), N(g_s^k(H_s^k))), N a LayerNorm without its affine
  map (``normalized``); LWD's D_layer is mean_k MSE(H_t^{M(k)}, W^k H_s^k) on the raw
  states; TED-KL replaces each MSE by KD between the filters' predictions through the Stage I head.
  ``combine_layers`` averages over k (the authors' code) or sums (Eq. 6).
- CR-ILD: on a mixup input, CE is lambda * CE(y) + (1 - lambda) * CE(y_rev) (``labels2``, ``mix``);
  attention relations compare two attention distributions over the causal keys (``attention_kl``).

Tokens whose label is ``IGNORE_INDEX`` count for neither CE nor KD. All loss math is fp32. The LM-head
losses take the run's ``LossSettings``; a head sharded by vocabulary (tensor parallelism) comes with
its ``shard`` and goes to the vocabulary-parallel fused losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ted_scale.data.loader import IGNORE_INDEX
from ted_scale.kernels import (
    Divergence,
    VocabShard,
    divergence_terms,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kd,
)

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class LossSettings:
    """How every LM-head loss of a run computes, from the config to the losses in one object.

    fused: the chunked fused losses (``fused_loss``) or full-logits PyTorch.
    compute_dtype: the dtype the head's matmuls run in (None: the hidden states' own).
    divergence, jsd_beta: KD's D (``distill.divergence``, ``distill.jsd_beta``).
    """

    fused: bool = True
    compute_dtype: torch.dtype | None = None
    divergence: Divergence = "forward_kl"
    jsd_beta: float = 0.5

    def head_input(self, hidden: Tensor) -> Tensor:
        """An LM head's input in the compute dtype: under autocast LayerNorm returns fp32, and
        the fused head's matmul runs in its input's dtype."""
        return hidden if self.compute_dtype is None else hidden.to(self.compute_dtype)


def cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    settings: LossSettings,
    *,
    shard: VocabShard | None = None,
    labels2: Tensor | None = None,
    mix: float = 1.0,
) -> Tensor:
    """Mean CE of ``hidden`` [B, T, d] (already final-normed) through ``head_weight`` [V, d]
    (this rank's vocabulary rows with ``shard``).

    With ``labels2`` [B, T]: mix * CE(labels) + (1 - mix) * CE(labels2) from the same logits.
    """
    hidden = settings.head_input(hidden)
    if settings.fused:
        return fused_linear_cross_entropy(
            hidden,
            head_weight,
            labels,
            ignore_index=IGNORE_INDEX,
            targets2=labels2,
            mix=mix,
            shard=shard,
        )
    logits = F.linear(hidden, head_weight).float().flatten(0, -2)
    ce = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)
    if labels2 is None:
        return ce
    ce2 = F.cross_entropy(logits, labels2.flatten(), ignore_index=IGNORE_INDEX)
    return mix * ce + (1.0 - mix) * ce2


def logit_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    settings: LossSettings,
    *,
    temperature: float,
    divergence: Divergence | None = None,
    shard: VocabShard | None = None,
) -> Tensor:
    """T^2 * D between two heads' predictions at temperature T, mean over tokens with a label:
    the KD term (D = ``settings.divergence``) and TED-KL's (``divergence="forward_kl"``).

    student_hidden [B, T, ds] with student_weight [V, ds]; teacher_hidden [B, T, dt] with
    teacher_weight [V, dt]; both hidden states already final-normed.
    """
    divergence = divergence or settings.divergence
    student_hidden, teacher_hidden = map(settings.head_input, (student_hidden, teacher_hidden))
    keep = labels != IGNORE_INDEX
    if settings.fused:
        return fused_linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            temperature=temperature,
            divergence=divergence,
            beta=settings.jsd_beta,
            mask=keep,
            shard=shard,
        )
    z_s = F.linear(student_hidden, student_weight).float()[keep]
    z_t = F.linear(teacher_hidden, teacher_weight).float()[keep]
    return _divergence_from_logits(z_s, z_t, temperature, divergence, settings.jsd_beta)


def cross_entropy_and_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    settings: LossSettings,
    *,
    temperature: float,
    alpha_kd: float,
    shard: VocabShard | None = None,
    labels2: Tensor | None = None,
    mix: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE + alpha_kd * KD sharing the student's logits; returns (loss, ce, kd), ce/kd detached.

    With ``labels2``, CE is the mixed one of ``cross_entropy``; KD stays over ``labels``' tokens.
    """
    student_hidden, teacher_hidden = map(settings.head_input, (student_hidden, teacher_hidden))
    if settings.fused:
        return fused_linear_ce_kd(
            student_hidden,
            student_weight,
            labels,
            teacher_hidden,
            teacher_weight,
            temperature=temperature,
            kd_weight=alpha_kd,
            divergence=settings.divergence,
            beta=settings.jsd_beta,
            ignore_index=IGNORE_INDEX,
            targets2=labels2,
            mix=mix,
            shard=shard,
        )
    z_s = F.linear(student_hidden, student_weight).float()
    keep = labels != IGNORE_INDEX
    ce = F.cross_entropy(z_s.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)
    if labels2 is not None:
        ce2 = F.cross_entropy(z_s.flatten(0, -2), labels2.flatten(), ignore_index=IGNORE_INDEX)
        ce = mix * ce + (1.0 - mix) * ce2
    z_t = F.linear(teacher_hidden, teacher_weight).float()
    kd = _divergence_from_logits(
        z_s[keep], z_t[keep], temperature, settings.divergence, settings.jsd_beta
    )
    return ce + alpha_kd * kd, ce.detach(), kd.detach()


def _divergence_from_logits(
    z_s: Tensor, z_t: Tensor, temperature: float, divergence: Divergence, beta: float
) -> Tensor:
    """T^2 * D(softmax(z_t/T), softmax(z_s/T)), mean over rows of [N, V] logits, with autograd
    through full fp32 logits (``fused_loss: false``)."""
    if z_s.shape[0] == 0:
        return z_s.sum() * 0.0
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    if divergence == "forward_kl":
        d = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    else:  # the kernels' per-element algebra, kept accurate where p_s and p_t nearly agree
        d = divergence_terms(divergence, beta, log_p_s, log_p_t)[0].sum()
    return d / z_s.shape[0] * temperature**2


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
