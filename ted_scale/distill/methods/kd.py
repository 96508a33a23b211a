"""``kd``: logit distillation, CE + alpha_kd * KD, the teacher tapped at its top only."""

from __future__ import annotations

from ted_scale.distill.methods.base import (
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.methods.registry import register
from ted_scale.distill.modules import FrozenTapper
from ted_scale.model import FAMILIES


@register
class KD(Method):
    name = "kd"
    teacher_apart = True
    model_families = FAMILIES  # it uses the models through their forward and head only

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        kd = ctx.config.distill.alpha_kd > 0
        return ctx.student_phase(
            phase,
            ctx.distillation(),
            FrozenTapper(ctx.teacher, [], with_top=True) if kd else None,
            lambda seq_len: student_flops(ctx, seq_len, kd=kd),
        )
