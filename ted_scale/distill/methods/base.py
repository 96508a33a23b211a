"""The method seam: what a distillation method provides, and what it builds from.

A method is one module in this package. It owns its config section (a dataclass the config loader
validates under its own key), its phases in order, and for each phase the trained module with its
loss, what it taps from the frozen teacher, and its FLOP count per token. The trainer, the
benchmark, checkpoints, plots and the progress file only see ``Phase`` objects; none of them names
a method or a phase (docs/design.md, "How to add a method").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from ted_scale.config.schema import ScheduleConfig
from ted_scale.distill.filters import FilterBank
from ted_scale.distill.modules import BatchDraw, FrozenTapper, LayerDistance, StudentDistillation
from ted_scale.distill.objectives import LossSettings
from ted_scale.flops import FROZEN, TRAINED, batch_factor, forward_flops, head_flops
from ted_scale.model import GPT, export_hf
from ted_scale.parallel import ParallelDims, barrier, gathered_state, parallelize_gpt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ted_scale.config.schema import RunConfig

PhaseKind = Literal["filters", "distill"]
"""``stage: filters`` runs a method's ``filters`` phases, ``stage: distill`` the ``distill`` ones,
``stage: all`` both, in the method's order."""


@dataclass(frozen=True)
class PlannedPhase:
    name: str
    kind: PhaseKind


@dataclass
class Phase:
    """One training phase, ready to run.

    trained: what the DeepSpeed engine wraps; ``forward(input_ids, labels, tapped)`` returns
        ``(loss, parts)`` with ``parts`` a dict of detached scalar tensors (``loss_ce`` ...).
        None: a phase without training steps, whose work is all in ``finish`` (computing and
        saving results; it saves them atomically, as a killed phase runs again).
    tapper: the frozen side, run on each micro-batch (ahead, on a side stream, when prefetching);
        None when nothing frozen is needed.
    flops_per_token: seq_len -> training FLOPs per token of one step.
    evaluated: the model the in-training evaluation scores (None: no evaluation in this phase).
    finish: run on every rank after the phase's last step (save filters, export a model).
    batch_draw: per-micro-batch random choices handed to the tapper and the trained module as
        keyword arguments (None: none).
    train_samples: the samples of ``data.train_split`` this phase trains on, a slice (None: all;
        MiniDisc keeps the split's last samples out of its sandwich as development data).
    """

    name: str
    trained: nn.Module | None
    tapper: FrozenTapper | None
    schedule: ScheduleConfig
    flops_per_token: Callable[[int], float]
    evaluated: GPT | None = None
    finish: Callable[[], None] = field(default=lambda: None)
    batch_draw: BatchDraw | None = None
    train_samples: slice | None = None


@dataclass
class ExtraModules:
    """The modules a method adds to the teacher and the student, for the memory estimate
    (``Method.extra_modules``; built on the meta device: shapes only).

    frozen: held without gradients in the storage dtype (TED's teacher filters).
    trained: trained with the student (student filters, LWD's projections, CR-ILD's fit layer).
    tapped_layers: student layers whose states the layer term compares (their inputs to the
        trained modules and the teacher's matching outputs are held for the loss).
    """

    frozen: nn.Module | None = None
    trained: nn.Module | None = None
    tapped_layers: int = 0


@dataclass
class MethodContext:
    """What a method builds its phases from: the run's config and models, where to put files, and
    the rank's place (``data_rank`` of ``data_ranks``: its data-parallel rank and their number).
    The trainer and the benchmark each make one."""

    config: RunConfig
    teacher: GPT | None
    student: GPT
    layer_map: list[int]
    device: torch.device
    compute_dtype: torch.dtype | None
    run_dir: Path
    tokenizer: PreTrainedTokenizerBase | None = None
    is_main: bool = True
    data_rank: int = 0
    data_ranks: int = 1
    log: Callable[[str], None] = print
    batches: Callable[..., list[tuple[Tensor, Tensor]]] | None = None
    """``batches(split, n, samples=None)``: the first ``n`` micro-batches (input_ids [B, T],
    labels [B, T]) of a data split, or of its samples ``samples`` (a slice), in the run's seeded
    order, the same on every rank (calibration, scoring); the last one padded (labels -100)."""
    dims: ParallelDims | None = None
    """The run's parallel layout (None: one process, nothing sharded)."""
    teacher_dims: ParallelDims | None = None
    """The teacher's own layout when it is split apart from the student
    (``parallel.teacher_tensor_parallel_size``); None or ``dims``: split alike."""

    @property
    def loss_settings(self) -> LossSettings:
        """How the run's LM-head losses compute (``fused_loss``, the precision, KD's divergence)."""
        return LossSettings(
            fused=self.config.fused_loss,
            compute_dtype=self.compute_dtype,
            divergence=self.config.distill.divergence,
            jsd_beta=self.config.distill.jsd_beta,
        )

    def place(self, model: GPT, role: str, *, pad: bool | None = None) -> GPT:
        """``model``, a whole model the method built itself (from its own saved file), on the
        run's device and sharded like the run's models (tensor parallelism); ``pad`` (default
        ``parallel.tensor_parallel_padding``) as in ``parallelize_gpt``."""
        model.to(self.device)
        if self.dims is not None:
            if pad is None:
                pad = self.config.parallel.tensor_parallel_padding
            parallelize_gpt(model, self.dims, role, pad=pad)
        return model

    def save_on_main(self, module: nn.Module, write: Callable[[dict], None]) -> None:
        """Gather ``module``'s full state (a collective under ZeRO-3), hand it to ``write`` on the
        main rank, and wait for it there."""
        state = gathered_state(module)
        if self.is_main:
            write(state)
        barrier()

    def distillation(
        self,
        *,
        student: GPT | None = None,
        layer_modules: FilterBank | None = None,
        layer_distance: LayerDistance | None = None,
        with_ce: bool = True,
    ) -> StudentDistillation:
        """The objective CE + alpha_kd * KD [+ alpha_layer * D] (KD alone without ``with_ce``) of
        ``student`` (default: the run's) with the run's shared knobs (``distill:``,
        ``fused_loss``, the precision)."""
        distill = self.config.distill
        return StudentDistillation(
            (student or self.student).to(self.device),
            self.loss_settings,
            layer_modules=layer_modules,
            layer_distance=layer_distance,
            alpha_kd=distill.alpha_kd,
            alpha_layer=distill.alpha_layer,
            temperature=distill.temperature,
            layer_reduction=distill.layer_reduction,
            with_ce=with_ce,
        )

    def student_phase(
        self,
        name: str,
        trained: nn.Module,
        tapper: FrozenTapper | None,
        flops_per_token: Callable[[int], float],
    ) -> Phase:
        """A phase training the student on the ``stage2`` schedule: evaluated in training,
        exported as ``student_hf/`` at its end."""
        return Phase(
            name,
            trained,
            tapper,
            self.config.stage2,
            flops_per_token,
            evaluated=self.student,
            finish=lambda: self.export(self.student, "student_hf"),
        )

    def export(self, model: GPT, name: str) -> None:
        """Write ``model`` (gathered) with the run's tokenizer as the HF folder ``run_dir/name``."""

        def write(state: dict) -> None:
            copy = GPT(model.config)
            copy.load_state_dict(state)
            path = export_hf(copy, self.run_dir / name, self.tokenizer)
            self.log(f"{name.removesuffix('_hf')} exported to {path}")

        self.save_on_main(model, write)


def student_flops(ctx: MethodContext, seq_len: int, *, kd: bool) -> float:
    """FLOPs per token shared by every student phase: the frozen teacher's trunk (and head for
    KD) forward, the student's trunk and head forward and backward."""
    teacher, student = ctx.teacher, ctx.student
    frozen = forward_flops(teacher.blocks, seq_len) * batch_factor(teacher)
    if kd:
        frozen += head_flops(teacher)
    trained = forward_flops(student.blocks, seq_len) + head_flops(student)
    return FROZEN * frozen + TRAINED * trained


class Method(ABC):
    """Base of every method: subclasses set the class attributes and implement the two methods.

    name: the value of ``method:`` that selects it.
    section: ``(key, dataclass)`` of its own config section, or None.
    needs_teacher: whether the run builds the frozen teacher.
    tensor_parallel: whether its phases run on tensor-parallel (sharded) models; if not,
        ``tensor_parallel_note`` says why.
    teacher_apart: whether its phases run with the teacher split over groups of its own and the
        student data-parallel (``parallel.teacher_tensor_parallel_size``: every frozen-teacher
        read goes through ``FrozenTapper`` and ``GPT.loss_head``); if not, ``teacher_apart_note``
        says why.
    model_families: the model families (``GPTConfig.family``) its phases are implemented for;
        a run of another is refused before it trains. GPT-2 only unless a method declares more:
        one that reaches inside the blocks (attention internals, pruning) must be checked first.
    tensor_parallel_families: those of them it runs on split over ranks (either tensor-parallel
        layout); None: all of ``model_families``.
    """

    name: ClassVar[str]
    section: ClassVar[tuple[str, type] | None] = None
    needs_teacher: ClassVar[bool] = True
    tensor_parallel: ClassVar[bool] = True
    tensor_parallel_note: ClassVar[str] = ""
    teacher_apart: ClassVar[bool] = False
    teacher_apart_note: ClassVar[str] = "not built for a teacher split apart from its student"
    model_families: ClassVar[tuple[str, ...]] = ("gpt2",)
    tensor_parallel_families: ClassVar[tuple[str, ...] | None] = None

    @abstractmethod
    def plan(self, config: RunConfig) -> list[PlannedPhase]:
        """The method's phases in order (all of them; ``stage:`` selects among them)."""

    @abstractmethod
    def build(self, phase: str, ctx: MethodContext) -> Phase:
        """Build ``phase`` (a name from ``plan``); earlier phases have finished."""

    def extra_modules(
        self, config: RunConfig, teacher: GPT, student: GPT, layer_map: list[int]
    ) -> ExtraModules:
        """The modules this method adds to ``teacher`` and ``student`` in its distillation
        phase, built with the run's shapes on the current device (the memory estimate calls it
        under ``torch.device("meta")``); default: none."""
        return ExtraModules()

    def benchmarked(self, config: RunConfig) -> str:
        """The phase whose step the throughput benchmark times: the method's characteristic
        step, by default its first ``distill`` phase."""
        return next(p.name for p in self.plan(config) if p.kind == "distill")


def build_benchmarked(method: Method, ctx: MethodContext) -> Phase:
    """``method``'s benchmarked phase, built as the trainer would build it: every phase before
    it is built and finished without training, so that it finds their files."""
    target = method.benchmarked(ctx.config)
    for planned in method.plan(ctx.config):
        phase = method.build(planned.name, ctx)
        if planned.name == target:
            return phase
        phase.finish()
    raise ValueError(f"method {method.name!r}: benchmarked phase {target!r} is not planned")
