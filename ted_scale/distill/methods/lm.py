"""``lm``: one model trained on next-token CE alone: teacher pre-training, transfer fine-tuning,
and the "student alone" baseline every distillation method must beat."""

from __future__ import annotations

from ted_scale.distill.methods.base import Method, MethodContext, Phase, PlannedPhase
from ted_scale.distill.methods.registry import register
from ted_scale.distill.modules import StudentDistillation
from ted_scale.flops import TRAINED, forward_flops, head_flops
from ted_scale.model import FAMILIES


@register
class LM(Method):
    name = "lm"
    model_families = FAMILIES  # it uses the models through their forward and head only
    needs_teacher = False

    def plan(self, config) -> list[PlannedPhase]:
        return [PlannedPhase("lm", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        def flops_per_token(seq_len: int) -> float:
            trunk = forward_flops(ctx.student.blocks, seq_len)
            return TRAINED * (trunk + head_flops(ctx.student))

        # No teacher: distill.alpha_kd is ignored, the objective is plain next-token CE.
        trained = StudentDistillation(ctx.student.to(ctx.device), ctx.loss_settings)
        return ctx.student_phase(phase, trained, None, flops_per_token)
