"""TED (task-aware layer-wise distillation) and its TED-KL variant (docs/design.md, "The method").

Stage I (``stage1_teacher``): the teacher is frozen and its K filters g_t^k train through its own
frozen head (final LayerNorm + tied LM head): loss = sum_k CE(head(g_t^k(H_t^{M(k)}))). With
``filters.student_filters: train`` a second Stage I (``stage1_student``) trains student filters
the same way on the frozen student. Stage II (``stage2``): teacher and teacher filters frozen; the
student and its filters train on CE + alpha_kd * KD + alpha_layer * D_TED, with
D_TED = mean_k MSE(N(g_t^k(H_t^{M(k)})), N(g_s^k(H_s^k))) and N a LayerNorm without its affine
map: the Stage I head ignores a filter output's scale, so the distance must too (docs/design.md,
"Fidelity"). TED-KL replaces each MSE by KD between the filters' predictions through the head
learned in Stage I (the teacher's frozen one; ``ted_kl.head: student`` uses the student's own).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ted_scale.config.parse import ConfigError
from ted_scale.distill.filter_io import (
    FilterRecord,
    check_record,
    load_filters_into,
    read_record,
    save_filters,
    weights_fingerprint,
)
from ted_scale.distill.filters import FilterArch, FilterBank, FilterInit, build_filters
from ted_scale.distill.methods.base import (
    ExtraModules,
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.methods.registry import register
from ted_scale.distill.modules import (
    FrozenTapper,
    LayerDistance,
    StateTransform,
    TappedOutputs,
)
from ted_scale.distill.objectives import (
    LossSettings,
    cross_entropy,
    logit_distillation,
    mse_distance,
    normalized,
)
from ted_scale.flops import FROZEN, TRAINED, batch_factor, forward_flops, head_flops
from ted_scale.model import FAMILIES, GPT, ModelMismatchError
from ted_scale.parallel import barrier, gathered_state
from ted_scale.precision import storage_dtype


@dataclass
class FilterConfig:
    """TED's section (``filters:``)."""

    arch: FilterArch = "linear"
    student_filters: Literal["copy", "train", "random"] = "copy"
    """Student filters: copies of the teacher's at M(k), trained like them on the frozen student,
    or randomly initialised."""
    mlp_hidden: int | None = None
    """Hidden width of ``mlp`` filters (default: the output width)."""
    init: FilterInit = "random"
    """Stage I filters start ``random`` (the paper, section 4.3; drawn from ``seed``) or, for
    square ``linear`` filters only, at the ``identity``. Block filters copy the later blocks."""

    def __post_init__(self) -> None:
        if self.init == "identity" and self.arch != "linear":
            raise ConfigError(
                f"filters.init=identity needs square linear filters, but filters.arch={self.arch}"
                " (use filters.init=random)"
            )


@dataclass
class TEDKLConfig:
    """TED-KL's section (``ted_kl:``)."""

    head: Literal["frozen", "student"] = "frozen"
    """The head that scores the student filters' predictions: ``frozen``, the Stage I head (the
    teacher's final LayerNorm and LM head; paper, Remark 3.2), or ``student``, the student's own
    trainable ones (the per-layer KL then trains them too)."""


class FilterTraining(nn.Module):
    """Stage I: filters trained through a frozen model's own head; loss = sum_k CE_k.

    The head (final norm + LM head) belongs to the frozen model and is kept out of this module's
    parameters, so the optimizer and ZeRO never see it.
    """

    def __init__(
        self,
        filters: FilterBank,
        frozen_model: GPT,
        settings: LossSettings,
    ) -> None:
        super().__init__()
        self.filters = filters
        # (final LayerNorm, head weight, its shard): a tuple is not registered as parameters.
        self._frozen_head = (frozen_model.ln_f, *frozen_model.loss_head())
        self.settings = settings

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``input_ids`` is unused (the frozen model already ran on it); the signature is the
        trained side's common one."""
        ln_f, head, shard = self._frozen_head
        # The frozen model ran under inference mode; its states become the filters' inputs, which
        # autograd must save, so they are copied into ordinary tensors (K x [B, T, d], cheap).
        states = [h.clone() for h in tapped.layer_states]
        per_layer = [
            cross_entropy(ln_f(g), head, labels, self.settings, shard=shard)
            for g in self.filters(states)
        ]
        loss = torch.stack(per_layer).sum()
        parts = {f"loss_filter_{k}": ce.detach() for k, ce in enumerate(per_layer)}
        return loss, parts


def ted_distance() -> tuple[StateTransform, LayerDistance]:
    """TED's layer term: the teacher side's transform of its filter outputs, N(g_t) [B, T, d_t],
    and the per-layer MSE(N(g_s), N(g_t)), N being ``normalized``."""

    def transform(filtered: list[Tensor]) -> list[Tensor]:
        return [normalized(g) for g in filtered]

    def distance(states: list[Tensor], tapped: TappedOutputs, labels: Tensor) -> list[Tensor]:
        return mse_distance(transform(states), tapped.layer_states)

    return transform, distance


def ted_kl_distance(head: GPT, settings: LossSettings, *, temperature: float) -> LayerDistance:
    """TED-KL's per-layer term: KD between the student filters' predictions through ``head``'s
    final LayerNorm and LM head (the frozen teacher's, or the student's own) and the teacher
    filters' predictions, already final-normed by the tapper, through the teacher's head."""

    def distance(states: list[Tensor], tapped: TappedOutputs, labels: Tensor) -> list[Tensor]:
        return [
            logit_distillation(
                head.ln_f(g_s),
                head.loss_head()[0],
                g_t,
                tapped.head_weight,
                labels,
                settings,
                temperature=temperature,
                divergence="forward_kl",  # TED-KL's definition, whatever distill.divergence
                shard=head.loss_head()[1],
            )
            for g_s, g_t in zip(states, tapped.layer_states, strict=True)
        ]

    return distance


@register
class TED(Method):
    name = "ted"
    teacher_apart = True
    model_families = FAMILIES  # it uses the models through their forward and head only
    section = ("filters", FilterConfig)

    def plan(self, config) -> list[PlannedPhase]:
        phases = [PlannedPhase("stage1_teacher", "filters")]
        if config.filters.student_filters == "train":
            phases.append(PlannedPhase("stage1_student", "filters"))
        return [*phases, PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        if phase == "stage1_teacher":
            return self._stage1(phase, ctx, ctx.teacher, ctx.layer_map, "teacher")
        if phase == "stage1_student":
            frozen = copy.deepcopy(ctx.student).to(ctx.device)
            return self._stage1(phase, ctx, frozen, list(range(frozen.config.n_layer)), "student")
        return self._stage2(ctx)

    def extra_modules(
        self, config, teacher: GPT, student: GPT, layer_map: list[int]
    ) -> ExtraModules:
        section = config.filters
        kwargs = {"d_out": teacher.config.n_embd, "mlp_hidden": section.mlp_hidden}
        kwargs["generator"] = torch.Generator()  # shapes only: any draw
        frozen = build_filters(section.arch, teacher, layer_map, **kwargs)
        layers = list(range(student.config.n_layer))
        trained = (
            copy.deepcopy(frozen)  # the teacher's filter at M(k), as _student_filters copies it
            if section.student_filters == "copy"
            else build_filters(section.arch, student, layers, **kwargs)
        )
        return ExtraModules(frozen, trained, tapped_layers=len(layers))

    # ------------------------------------------------------------------------- filters
    @staticmethod
    def _new_filters(
        ctx: MethodContext,
        model: GPT,
        layers: list[int],
        role: Literal["teacher", "student"],
        *,
        init: FilterInit | None = None,
        reinit_blocks: bool = False,
    ) -> FilterBank:
        """``role``'s filters on ``model``, initialised from the run's seeded stream for that role
        (``init`` default: ``filters.init``), so another ``seed`` draws another init."""
        stream = ("teacher", "student").index(role)
        arch = ctx.config.filters.arch
        if arch in ("next_block", "rest_blocks") and model.tensor_parallel is not None:
            # A copy of a split block is one rank's shard: it would train without the split
            # model's gradient hooks and flags, save as a shard, and (split apart) run the
            # group's collectives on each rank's own rows.
            raise ConfigError(
                f"filters.arch={arch} with the {role} split over ranks "
                f"(parallel.tensor_parallel_size / teacher_tensor_parallel_size > 1): block "
                "filters copy split blocks, which is not built; use filters.arch linear or mlp"
            )
        return build_filters(
            ctx.config.filters.arch,
            model,
            layers,
            d_out=ctx.teacher.config.n_embd,
            generator=torch.Generator().manual_seed(ctx.config.seed + stream * 2**32),
            mlp_hidden=ctx.config.filters.mlp_hidden,
            init=init or ctx.config.filters.init,
            reinit_blocks=reinit_blocks,
        ).to(ctx.device, dtype=torch.float32)  # block filters copy a bf16 teacher's blocks

    @staticmethod
    def _record(ctx: MethodContext) -> FilterRecord:
        return FilterRecord(
            teacher=ctx.config.teacher.pretrained or "random",
            teacher_fingerprint=weights_fingerprint(ctx.teacher),
            layer_map=ctx.layer_map,
            arch=ctx.config.filters.arch,
            d_in=ctx.teacher.config.n_embd,
            d_out=ctx.teacher.config.n_embd,
        )

    def _filters_dir(self, ctx: MethodContext) -> Path:
        return Path(ctx.config.filters_from or ctx.run_dir / "filters")

    def _teacher_filters(self, ctx: MethodContext) -> FilterBank:
        """The Stage I teacher filters from disk, checked against this teacher and map."""
        filters_dir = self._filters_dir(ctx)
        bank = self._new_filters(ctx, ctx.teacher, ctx.layer_map, "teacher")
        check_record(read_record(filters_dir), self._record(ctx), filters_dir)
        load_filters_into(bank, filters_dir, "teacher")
        return bank.to(dtype=storage_dtype(ctx.compute_dtype))

    def _student_filters(self, ctx: MethodContext, teacher_filters: FilterBank) -> FilterBank:
        layers = list(range(ctx.student.config.n_layer))
        mode = ctx.config.filters.student_filters
        d_s, d_t = ctx.student.config.n_embd, ctx.teacher.config.n_embd
        if mode in ("copy", "train") and d_s != d_t:
            raise ModelMismatchError(
                f"filters.student_filters={mode} needs the student width ({d_s}) to equal the "
                f"teacher's ({d_t})"
            )
        if mode == "copy":
            # Filter k is the teacher's filter at M(k), structure and all (a block filter keeps
            # the teacher's later blocks, however many the student has after block k).
            bank = copy.deepcopy(teacher_filters)
            bank.layers = layers
        elif mode == "train":
            bank = self._new_filters(ctx, ctx.student, layers, "student")
            load_filters_into(bank, self._filters_dir(ctx), "student")
        else:  # random: every filter drawn afresh, block filters too
            bank = self._new_filters(
                ctx, ctx.student, layers, "student", init="random", reinit_blocks=True
            )
        return bank.float().requires_grad_(True).train()

    # ------------------------------------------------------------------------- phases
    def _stage1(
        self,
        name: str,
        ctx: MethodContext,
        model: GPT,
        layers: list[int],
        role: Literal["teacher", "student"],
    ) -> Phase:
        bank = self._new_filters(ctx, model, layers, role)

        def flops_per_token(seq_len: int) -> float:
            trunk = forward_flops(model.blocks[: max(layers) + 1], seq_len) * batch_factor(model)
            trained = forward_flops(bank, seq_len) + len(layers) * head_flops(model)
            return FROZEN * trunk + TRAINED * trained

        def finish() -> None:
            banks = {"teacher": bank}
            if name == "stage1_student":
                banks = {"teacher": self._teacher_filters(ctx), "student": bank}
            states = {role: gathered_state(b) for role, b in banks.items()}
            record = self._record(ctx)  # a collective under tensor parallelism
            if ctx.is_main:
                save_filters(states, record, ctx.run_dir / "filters")
                ctx.log(f"filters saved to {ctx.run_dir / 'filters'}")
            barrier()

        return Phase(
            name,
            FilterTraining(bank, model, ctx.loss_settings),
            FrozenTapper(model, layers),
            ctx.config.stage1,
            flops_per_token,
            finish=finish,
        )

    def _layer_term(
        self, ctx: MethodContext, teacher_filters: FilterBank
    ) -> tuple[StateTransform, LayerDistance, GPT | None]:
        """The teacher side's transform, the per-layer distance, and the model whose head the
        student filters' outputs go through (None: no head)."""
        transform, distance = ted_distance()
        return lambda states: transform(teacher_filters(states)), distance, None

    def _stage2(self, ctx: MethodContext) -> Phase:
        config, teacher = ctx.config, ctx.teacher
        teacher_filters = self._teacher_filters(ctx)
        student_filters = self._student_filters(ctx, teacher_filters)
        teacher_filters.eval().requires_grad_(False)
        alpha_kd = config.distill.alpha_kd
        transform, distance, head = self._layer_term(ctx, teacher_filters)
        tapper = FrozenTapper(
            teacher, ctx.layer_map, transform=transform, with_top=alpha_kd > 0 or head is not None
        )
        trained = ctx.distillation(layer_modules=student_filters, layer_distance=distance)
        k = len(student_filters.filters)

        def flops_per_token(seq_len: int) -> float:
            frozen = forward_flops(teacher_filters, seq_len)
            trained_ = forward_flops(student_filters, seq_len)
            if head is not None:  # the teacher filters' head (1x), the student filters' (3x)
                frozen += k * head_flops(teacher)
                trained_ += k * head_flops(head)
            return (
                student_flops(ctx, seq_len, kd=alpha_kd > 0) + FROZEN * frozen + TRAINED * trained_
            )

        return ctx.student_phase("stage2", trained, tapper, flops_per_token)


@register
class TEDKL(TED):
    name = "ted_kl"
    teacher_apart = False
    teacher_apart_note = (
        "its student filters score through the frozen teacher's head, which would be split over "
        "ranks that read different batches"
    )
    section = ("ted_kl", TEDKLConfig)  # and TED's ``filters:``

    def _layer_term(
        self, ctx: MethodContext, teacher_filters: FilterBank
    ) -> tuple[StateTransform, LayerDistance, GPT | None]:
        teacher = ctx.teacher
        head = teacher if ctx.config.ted_kl.head == "frozen" else ctx.student
        distance = ted_kl_distance(
            head, ctx.loss_settings, temperature=ctx.config.distill.temperature
        )
        return lambda states: [teacher.ln_f(g) for g in teacher_filters(states)], distance, head
