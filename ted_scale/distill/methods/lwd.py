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
from ted_scale.distill.modules import FrozenTapper, StudentDistillation
from ted_scale.distill.objectives import mse_distance
from ted_scale.flops import TRAINED, forward_flops


@register
class LWD(Method):
    name = "lwd"

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        distill = ctx.config.distill
        d_s, d_t = ctx.student.config.n_embd, ctx.teacher.config.n_embd
        layers = list(range(ctx.student.config.n_layer))
        projections = FilterBank([torch.nn.Linear(d_s, d_t) for _ in layers], layers)
        projections.to(ctx.device)
        student = ctx.student.to(ctx.device)
        trained = StudentDistillation(
            student,
            layer_modules=projections,
            layer_distance=lambda states, tapped, _: mse_distance(states, tapped.layer_states),
            alpha_kd=distill.alpha_kd,
            alpha_layer=distill.alpha_layer,
            temperature=distill.temperature,
            layer_reduction=distill.layer_reduction,
            fused=ctx.config.fused_loss,
            compute_dtype=ctx.compute_dtype,
        )
        kd = distill.alpha_kd > 0

        def flops_per_token(seq_len: int) -> float:
            return student_flops(ctx, seq_len, kd=kd) + TRAINED * forward_flops(
                projections, seq_len
            )

        return Phase(
            phase,
            trained,
            FrozenTapper(ctx.teacher, ctx.layer_map, with_top=kd),
            ctx.config.stage2,
            flops_per_token,
            evaluated=student,
            finish=lambda: ctx.export(student, "student_hf"),
        )
