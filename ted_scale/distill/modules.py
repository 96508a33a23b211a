"""The two sides of distillation as modules.

``FrozenTapper`` runs a frozen model (and its frozen filters) under inference mode and hands over
what the losses need; it is never part of the optimizer or of ZeRO's partitions. ``FilterTraining``
(Stage I) and ``StudentDistillation`` (Stage II, and plain LM training) are what the DeepSpeed
engine wraps: all of their parameters train, and they compute their whole loss inside ``forward``
so that ZeRO-3 gathers every partitioned weight the loss touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ted_scale.distill.filters import FilterBank
from ted_scale.distill.objectives import (
    Reduction,
    combine_layers,
    cross_entropy,
    cross_entropy_and_kd,
    kl_distillation,
    mse,
)
from ted_scale.model.gpt import GPT

Method = Literal["lm", "kd", "lwd", "ted", "ted_kl"]


@dataclass
class TappedOutputs:
    """What a frozen model hands to the trained side for one micro-batch.

    layer_states: K tensors [B, T, d_t]: filtered states (TED), filtered-and-final-normed states
        (TED-KL) or raw residual-stream states (LWD, Stage I).
    last_hidden: final-normed top hidden state [B, T, d_t] for KD (None when not needed).
    head_weight: the frozen model's LM head [V, d_t] (None when not needed).
    """

    layer_states: list[Tensor] = field(default_factory=list)
    last_hidden: Tensor | None = None
    head_weight: Tensor | None = None


class FrozenTapper:
    """A frozen model read at chosen layers, optionally through its frozen filters.

    mode: ``raw`` hands over H at ``layers``; ``filtered`` hands over g(H); ``filtered_normed``
    hands over ln_f(g(H)) for TED-KL. ``with_top`` adds the final-normed top state and the LM
    head for KD.
    """

    def __init__(
        self,
        model: GPT,
        layers: list[int],
        *,
        filters: FilterBank | None = None,
        mode: Literal["raw", "filtered", "filtered_normed"] = "raw",
        with_top: bool = False,
    ) -> None:
        if mode != "raw" and filters is None:
            raise ValueError(f"mode {mode!r} needs filters")
        self.model = model.eval().requires_grad_(False)
        self.filters = filters.eval().requires_grad_(False) if filters is not None else None
        self.layers = layers
        self.mode = mode
        self.with_top = with_top

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor) -> TappedOutputs:
        top = self.with_top or self.mode == "filtered_normed"
        out = self.model(
            input_ids,
            output_layers=self.layers,
            return_logits=False,
            stop_after=max(self.layers) if self.layers and not top else None,
        )
        states = [out.hidden_states[i] for i in self.layers]
        if self.mode != "raw":
            states = self.filters(states)
        if self.mode == "filtered_normed":
            states = [self.model.ln_f(s) for s in states]
        if not self.with_top:
            return TappedOutputs(layer_states=states)
        return TappedOutputs(states, out.last_hidden, self.model.lm_head_weight)


def _to(hidden: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The LM head's input in the compute dtype: under autocast LayerNorm returns fp32, and the
    fused head's matmul runs in its input's dtype."""
    return hidden if dtype is None else hidden.to(dtype)


class FilterTraining(nn.Module):
    """Stage I: filters trained through a frozen model's own head; loss = sum_k CE_k.

    The head (final LayerNorm + tied LM head) belongs to the frozen model and is kept out of this
    module's parameters, so the optimizer and ZeRO never see it.
    """

    def __init__(
        self,
        filters: FilterBank,
        frozen_model: GPT,
        *,
        fused: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.filters = filters
        self._frozen_head = (frozen_model.ln_f, frozen_model.wte)  # a tuple is not registered
        self.fused = fused
        self.compute_dtype = compute_dtype

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``input_ids`` is unused (the frozen model already ran on it); the signature is the
        trained side's common one."""
        ln_f, wte = self._frozen_head
        # The frozen model ran under inference mode; its states become the filters' inputs, which
        # autograd must save, so they are copied into ordinary tensors (K x [B, T, d], cheap).
        states = [h.clone() for h in tapped.layer_states]
        per_layer = [
            cross_entropy(_to(ln_f(g), self.compute_dtype), wte.weight, labels, fused=self.fused)
            for g in self.filters(states)
        ]
        loss = torch.stack(per_layer).sum()
        parts = {f"loss_filter_{k}": ce.detach() for k, ce in enumerate(per_layer)}
        return loss, parts


class StudentDistillation(nn.Module):
    """Stage II: CE + alpha_kd * KD + alpha_layer * D (and plain CE for ``method='lm'``).

    ``layer_modules`` are the student filters (TED, TED-KL) or the LWD projections W^k; the
    student's states are read at its blocks ``0..K-1`` in order.
    """

    def __init__(
        self,
        student: GPT,
        method: Method,
        *,
        layer_modules: FilterBank | None = None,
        alpha_kd: float = 0.0,
        alpha_layer: float = 0.0,
        temperature: float = 1.0,
        layer_reduction: Reduction = "sum",
        fused: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (method in ("lwd", "ted", "ted_kl")) != (layer_modules is not None):
            raise ValueError(f"method {method!r} and layer_modules do not fit together")
        self.student = student
        self.layer_modules = layer_modules
        self.method = method
        self.alpha_kd = alpha_kd
        self.alpha_layer = alpha_layer
        self.temperature = temperature
        self.layer_reduction = layer_reduction
        self.fused = fused
        self.compute_dtype = compute_dtype

    def _head_input(self, hidden: Tensor) -> Tensor:
        return _to(hidden, self.compute_dtype)

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n_layers = len(self.layer_modules.layers) if self.layer_modules is not None else 0
        out = self.student(input_ids, output_layers=range(n_layers), return_logits=False)
        top = self._head_input(out.last_hidden)
        weight = self.student.lm_head_weight
        parts: dict[str, Tensor] = {}
        if self.method == "lm" or self.alpha_kd == 0.0:
            loss = ce = cross_entropy(top, weight, labels, fused=self.fused)
            parts["loss_ce"] = ce.detach()
        else:
            loss, parts["loss_ce"], parts["loss_kd"] = cross_entropy_and_kd(
                top,
                weight,
                labels,
                self._head_input(tapped.last_hidden),
                tapped.head_weight,
                temperature=self.temperature,
                alpha_kd=self.alpha_kd,
                fused=self.fused,
            )
        if self.layer_modules is None:
            return loss, parts
        student_states = self.layer_modules([out.hidden_states[k] for k in range(n_layers)])
        if self.method == "ted_kl":
            per_layer = [
                kl_distillation(
                    self._head_input(self.student.ln_f(g_s)),
                    weight,
                    self._head_input(g_t),
                    tapped.head_weight,
                    labels,
                    temperature=self.temperature,
                    fused=self.fused,
                )
                for g_s, g_t in zip(student_states, tapped.layer_states, strict=True)
            ]
        else:
            per_layer = [
                mse(s, t) for s, t in zip(student_states, tapped.layer_states, strict=True)
            ]
        distance = combine_layers(per_layer, self.layer_reduction)
        parts["loss_layer"] = distance.detach()
        parts.update({f"loss_layer_{k}": d.detach() for k, d in enumerate(per_layer)})
        return loss + self.alpha_layer * distance, parts
