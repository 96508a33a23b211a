"""``lwd``: layer-wise distillation, CE + alpha_kd * KD + alpha_layer * sum_k MSE(H_t^{M(k)},
W^k H_s^k) with learnable, randomly initialised projections W^k and no Stage I."""

from __future__ import annotations

import torch

from ted_scale.distill.filters import FilterBank
from ted_scale.distill.methods import register
from ted_scale.distill.methods.base import (
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.modules import FrozenTapper
from ted_scale.distill.objectives import mse_distance
from ted_scale.flops import TRAINED, forward_flops


@register
class LWD(Method):
    name = "lwd"

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        d_s, d_t = ctx.student.config.n_embd, ctx.teacher.config.n_embd
        layers = list(range(ctx.student.config.n_layer))
        projections = FilterBank([torch.nn.Linear(d_s, d_t) for _ in layers], layers)
        projections.to(ctx.device)
        trained = ctx.distillation(
            layer_modules=projections,
            layer_distance=lambda states, tapped, _: mse_distance(states, tapped.layer_states),
        )
        kd = ctx.config.distill.alpha_kd > 0

        def flops_per_token(seq_len: int) -> float:
            return student_flops(ctx, seq_len, kd=kd) + TRAINED * forward_flops(
                projections, seq_len
            )

        return ctx.student_phase(
            phase, trained, FrozenTapper(ctx.teacher, ctx.layer_map, with_top=kd), flops_per_token
        )
