"""``kd``: logit distillation, CE + alpha_kd * KD, the teacher tapped at its top only."""

from __future__ import annotations

from ted_scale.distill.methods import register
from ted_scale.distill.methods.base import (
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.modules import FrozenTapper, StudentDistillation


@register
class KD(Method):
    name = "kd"

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        distill = ctx.config.distill
        kd = distill.alpha_kd > 0
        student = ctx.student.to(ctx.device)
        trained = StudentDistillation(
            student,
            alpha_kd=distill.alpha_kd,
            temperature=distill.temperature,
            fused=ctx.config.fused_loss,
            compute_dtype=ctx.compute_dtype,
        )
        return Phase(
            phase,
            trained,
            FrozenTapper(ctx.teacher, [], with_top=True) if kd else None,
            ctx.config.stage2,
            lambda seq_len: student_flops(ctx, seq_len, kd=kd),
            evaluated=student,
            finish=lambda: ctx.export(student, "student_hf"),
        )
