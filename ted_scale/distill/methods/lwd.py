"""``lwd``: layer-wise distillation, CE + alpha_kd * KD + alpha_layer * sum_k MSE(H_t^{M(k)},
W^k H_s^k) with learnable, randomly initialised projections W^k and no Stage I."""

from __future__ import annotations

import torch

from ted_scale.distill.filters import FilterBank
from ted_scale.distill.methods.base import (
    ExtraModules,
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.methods.registry import register
from ted_scale.distill.modules import FrozenTapper
from ted_scale.distill.objectives import mse_distance
from ted_scale.flops import TRAINED, forward_flops
from ted_scale.model import FAMILIES, GPT


def projections(student: GPT, teacher: GPT) -> FilterBank:
    """W^k: student width -> teacher width, one per student block, randomly initialised."""
    d_s, d_t = student.config.n_embd, teacher.config.n_embd
    layers = list(range(student.config.n_layer))
    return FilterBank([torch.nn.Linear(d_s, d_t) for _ in layers], layers)


@register
class LWD(Method):
    name = "lwd"
    teacher_apart = True
    model_families = FAMILIES  # it uses the models through their forward and head only

    def extra_modules(
        self, config, teacher: GPT, student: GPT, layer_map: list[int]
    ) -> ExtraModules:
        return ExtraModules(trained=projections(student, teacher), tapped_layers=len(layer_map))

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        layer_modules = projections(ctx.student, ctx.teacher).to(ctx.device)
        trained = ctx.distillation(
            layer_modules=layer_modules,
            layer_distance=lambda states, tapped, _: mse_distance(states, tapped.layer_states),
        )
        kd = ctx.config.distill.alpha_kd > 0

        def flops_per_token(seq_len: int) -> float:
            return student_flops(ctx, seq_len, kd=kd) + TRAINED * forward_flops(
                layer_modules, seq_len
            )

        return ctx.student_phase(
            phase, trained, FrozenTapper(ctx.teacher, ctx.layer_map, with_top=kd), flops_per_token
        )
