"""The memory estimate of a whole run configuration: its models built on the meta device by the
trainer's own constructors, the method's extra modules reported by the method itself, and the
check that refuses a run before it builds anything that does not fit.

The arithmetic (bytes per part at a layout) is ``ted_scale.parallel.memory_per_gpu``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ted_scale.config import ConfigError, RunConfig
from ted_scale.distill.methods import get_method
from ted_scale.distill.methods.base import ExtraModules
from ted_scale.distill.run_models import run_model_shapes
from ted_scale.flops import TRAINED, forward_flops, head_flops
from ted_scale.model.gpt import GPT, GPTConfig
from ted_scale.parallel.memory_per_gpu import (
    DEEPSPEED_REDUCE_BUCKET,
    FP32,
    GIB,
    Layout,
    MemoryEstimate,
    estimate_memory,
    format_table,
    largest_micro_batch,
)
from ted_scale.precision import compute_dtype


@dataclass
class EstimatedModels:
    """A run's models on the meta device (shapes only) and what its method adds to them."""

    teacher: GPT
    student: GPT
    extra: ExtraModules
    kd: bool

    def estimate(self, layout: Layout, *, teacher_ahead: bool = False) -> MemoryEstimate:
        return estimate_memory(
            self.teacher,
            self.student,
            layout,
            frozen_modules=self.extra.frozen,
            trained_modules=self.extra.trained,
            tapped_layers=self.extra.tapped_layers,
            kd=self.kd,
            teacher_ahead=teacher_ahead,
        )


def run_models(config: RunConfig) -> EstimatedModels:
    """Teacher, student and the method's extra modules of ``config`` on the meta device, built
    by the trainer's own constructors (``run_model_shapes``), so every shape is the run's."""
    shapes = run_model_shapes(config)
    with torch.device("meta"):
        extra = get_method(config.method).extra_modules(
            config, shapes.teacher, shapes.student, shapes.layer_map
        )
    return EstimatedModels(shapes.teacher, shapes.student, extra, config.distill.alpha_kd > 0)


def run_layout(
    config: RunConfig, *, tp: int, world: int, seq_len: int, teacher_tp: int | None = None
) -> Layout:
    """The ``Layout`` of a ``RunConfig`` at tensor-parallel size ``tp`` on ``world`` GPUs, the
    teacher split apart over ``teacher_tp`` ranks when given (and not ``tp``)."""
    if world % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the world size {world}")
    if teacher_tp is not None and world % teacher_tp:
        raise ValueError(
            f"teacher_tensor_parallel_size={teacher_tp} does not divide the world size {world}"
        )
    apart = teacher_tp is not None and teacher_tp != tp
    zero = config.deepspeed.extra.get("zero_optimization", {})
    return Layout(
        tp=tp,
        dp=world // tp,
        zero_stage=config.deepspeed.stage_at(world // tp),
        micro_batch=config.batch.micro_batch_size,
        seq_len=seq_len,
        compute_bytes=FP32 if config.precision == "fp32" else 2,
        activation_checkpointing=config.model.activation_checkpointing,
        sequence_parallel=config.parallel.sequence_parallel and tp > 1,
        padding=config.parallel.tensor_parallel_padding and (tp > 1 or apart),
        flash_attention=config.model.attention != "eager",
        offload_optimizer=config.deepspeed.offload_optimizer,
        reduce_bucket=int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)),
        teacher_tp=teacher_tp if apart else None,
    )


def run_memory_table(
    config: RunConfig,
    *,
    tps: list[int],
    world: int,
    seq_len: int,
    gpus_gib: list[float],
    with_sp: bool,
    teacher_tps: list[int] = (),
) -> str:
    """The Markdown table of a ``RunConfig`` at each tensor-parallel size in ``tps`` on ``world``
    GPUs (and, with ``with_sp``, each tp > 1 again with sequence parallelism), then with the
    teacher alone split over each size in ``teacher_tps`` (the student data-parallel over all),
    with whether it fits and the largest micro-batch that fits on GPUs of each size in
    ``gpus_gib``; below it, the step's FLOPs per token, teacher against student."""
    models = run_models(config)

    def estimate_at(layout: Layout) -> MemoryEstimate:
        # "auto" prefetches the teacher on a GPU.
        return models.estimate(layout, teacher_ahead=config.teacher_prefetch != "off")

    layouts = []
    for tp in tps:
        layouts.append(run_layout(config, tp=tp, world=world, seq_len=seq_len))
        if with_sp and tp > 1 and not layouts[-1].sequence_parallel:
            layouts.append(replace(layouts[-1], sequence_parallel=True))
    for teacher_tp in teacher_tps:
        layouts.append(
            run_layout(config, tp=1, world=world, seq_len=seq_len, teacher_tp=teacher_tp)
        )
    estimates = [estimate_at(layout) for layout in layouts]
    extra = {}
    for gib in gpus_gib:
        extra[f"fits in {gib:g} GiB"] = [
            "yes" if e.total <= gib * GIB else "**no**" for e in estimates
        ]
        extra[f"largest micro-batch in {gib:g} GiB"] = [
            str(largest_micro_batch(e, estimate_at, gib * GIB)) for e in estimates
        ]
    return format_table(estimates, extra) + "\n\n" + flop_split(models, seq_len)


def flop_split(models: EstimatedModels, seq_len: int) -> str:
    """The step's FLOPs per token of training data: the frozen teacher's forward (its trunk and,
    with KD, its head) against the student's forward and backward (the method's own modules not
    counted); the same in every layout (a split teacher does 1/k of the work of k micro-batches
    per rank)."""
    teacher = forward_flops(models.teacher.blocks, seq_len)
    teacher += head_flops(models.teacher) if models.kd else 0
    student = TRAINED * (forward_flops(models.student.blocks, seq_len) + head_flops(models.student))
    share = teacher / (teacher + student)
    return (
        f"FLOPs per token at sequence length {seq_len}: teacher forward {teacher / 1e9:.2f} G, "
        f"student forward + backward {student / 1e9:.2f} G (the teacher {share:.0%} of the step)"
    )


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this machine has free for a rank on ``device``, and where it was read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has"
    import psutil  # a DeepSpeed dependency

    return psutil.virtual_memory().available, "this machine has"


def check_run_fits(
    config: RunConfig, device: torch.device, *, tp: int, world: int, seq_len: int
) -> None:
    """Refuse, before any model is built, a run whose estimate (:func:`estimate_memory` of its
    shapes on the meta device, less DeepSpeed's lazily sized reduction bucket) exceeds the memory
    free on ``device``: on a CPU, for all the ranks this machine runs. A teacher whose shape is
    not known offline (a hub name other than GPT-2's) is not checked here."""
    try:
        models = run_models(config)
    except (ValueError, OSError):  # a shape not known offline: the build itself will tell
        return
    layout = replace(
        run_layout(
            config,
            tp=tp,
            world=world,
            seq_len=seq_len,
            teacher_tp=config.parallel.teacher_tensor_parallel_size,
        ),
        compute_bytes=FP32 if compute_dtype(config.precision, device) is None else 2,
        reduce_bucket=0,
    )
    estimate = models.estimate(layout)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    needed = estimate.total * ranks
    free, where = available_bytes(device)
    if needed <= free:
        return
    largest = sorted(estimate.parts.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {size / GIB:.1f}" for name, size in largest)
    raise ConfigError(
        f"the run needs about {needed / GIB:.1f} GiB ({ranks} rank(s) x {estimate.total / GIB:.1f}"
        f" GiB; largest: {parts} GiB) and {where} {free / GIB:.1f} GiB free. It grows with the "
        f"teacher ({_shape(models.teacher.config)}: teacher.pretrained / teacher.arch), the "
        f"student ({_shape(models.student.config)}: student.n_layer, student.init), "
        f"batch.micro_batch_size={config.batch.micro_batch_size} and the data's seq_len "
        f"{seq_len}; `launch/estimate_memory.py` shows the table"
    )


def _shape(c: GPTConfig) -> str:
    return f"n_layer={c.n_layer}, n_embd={c.n_embd}, vocab_size={c.vocab_size}"
