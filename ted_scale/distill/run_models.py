"""The run's teacher, student and tokenizer, made in one place: loaded or initialised as the run
configuration says, checked against each other, and placed (dtype, device, tensor-parallel
sharding with the configured padding, per-block compile). The trainer, the throughput benchmark,
MiniDisc's final hop and the memory estimate (shapes only, on the meta device) all build here, so
they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast

from ted_scale.config.schema import RunConfig
from ted_scale.data import DataError
from ted_scale.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from ted_scale.distill.layer_map import resolve_layer_map
from ted_scale.model import (
    GPT,
    ModelMismatchError,
    load_pretrained,
    set_dropout,
    student_from_teacher,
)
from ted_scale.model.compile import compile_blocks, compile_enabled
from ted_scale.model.hf import pretrained_shape
from ted_scale.parallel import ParallelDims, parallelize_gpt
from ted_scale.precision import storage_dtype

# Any of these in a model folder means it ships a tokenizer, which must then load whole.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def folder_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved beside a local HF model folder, if there is one."""
    if name_or_path and any((Path(name_or_path) / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(name_or_path)
    return None


def run_tokenizer(config: RunConfig) -> PreTrainedTokenizerFast:
    """The tokenizer the training data was prepared with (``data.path/tokenizer``)."""
    path = Path(config.data.path) / "tokenizer"
    if not path.is_dir():
        raise DataError(
            f"{config.data.path}: no tokenizer/ folder; prepare it with launch/prepare_data.py"
        )
    return load_tokenizer(str(path))


def build_teacher(config: RunConfig) -> GPT:
    """The frozen teacher: a pretrained HF checkpoint (GPT-2 or the Llama family) or, with
    ``teacher.pretrained: null``, random."""
    kwargs = {"attention": config.model.attention}
    if config.teacher.pretrained:
        teacher = load_pretrained(config.teacher.pretrained, **kwargs)
    else:
        teacher = GPT(config.teacher.arch, **kwargs)
    return teacher.eval().requires_grad_(False)


def teacher_layer_map(config: RunConfig, teacher: GPT) -> list[int]:
    try:
        return resolve_layer_map(
            config.student.layer_map, len(teacher.blocks), config.student.n_layer
        )
    except ValueError as e:
        raise ModelMismatchError(f"student.layer_map: {e}") from e


def build_student(config: RunConfig, teacher: GPT | None) -> GPT:
    """The student as ``student.init`` says: teacher blocks at the layer map, an HF checkpoint, or
    random with the teacher's shape and ``student.n_layer`` blocks."""
    init = config.student.init
    kwargs = {
        "attention": config.model.attention,
        "activation_checkpointing": config.model.activation_checkpointing,
    }
    if init == "pretrained":
        student = load_pretrained(config.student.pretrained, **kwargs)
        set_dropout(student, config.student.dropout)
    elif init == "teacher_layers":
        student = student_from_teacher(
            teacher, teacher_layer_map(config, teacher), dropout=config.student.dropout
        )
        student.activation_checkpointing = config.model.activation_checkpointing
    else:
        shape = teacher.config if teacher is not None else config.teacher.arch
        arch = replace(shape, n_layer=config.student.n_layer, dropout=config.student.dropout)
        student = GPT(arch, **kwargs)
    return student.train().requires_grad_(True)


@dataclass
class RunModels:
    """What a ``MethodContext`` needs of the run's models.

    teacher: the frozen teacher (None for a method without one, e.g. ``lm``).
    student: the trained student.
    layer_map: the teacher block each student block is matched with ([] without a teacher).
    """

    teacher: GPT | None
    student: GPT
    layer_map: list[int]


def place(
    model: GPT,
    role: Literal["teacher", "student"],
    config: RunConfig,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    dims: ParallelDims | None,
    *,
    pad: bool,
    gathers_batch: bool = False,
) -> GPT:
    """``model`` placed for its role: a teacher frozen (eval, no gradients) in the storage dtype,
    a student in fp32 (master weights under autocast), on ``device``; sharded over ``dims``'
    tensor-parallel group (``pad``, ``gathers_batch``: as ``parallelize_gpt``); blocks compiled
    when ``model.compile`` says so on ``device``."""
    if role == "teacher":
        model.eval().requires_grad_(False).to(device, dtype=storage_dtype(compute_dtype))
    else:
        model.to(device)
    if dims is not None:
        parallelize_gpt(model, dims, role, pad=pad, gathers_batch=gathers_batch)
    if compile_enabled(config.model.compile, device):
        compile_blocks(model)
    return model


def place_teacher(
    teacher: GPT,
    config: RunConfig,
    device: torch.device,
    compute_dtype: torch.dtype | None,
    dims: ParallelDims | None,
    teacher_dims: ParallelDims | None,
    *,
    pad: bool,
) -> GPT:
    """``place`` for a frozen teacher: split like the student over ``dims``, or over its own
    ``teacher_dims`` (``parallel.teacher_tensor_parallel_size``; None or ``dims``: alike), whose
    groups then gather their batches."""
    apart = teacher_dims is not None and teacher_dims is not dims
    layout = teacher_dims if apart else dims
    return place(
        teacher, "teacher", config, device, compute_dtype, layout, pad=pad, gathers_batch=apart
    )


def build_run_models(
    config: RunConfig,
    *,
    needs_teacher: bool,
    model_families: Collection[str],
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    dims: ParallelDims | None = None,
    teacher_dims: ParallelDims | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    tensor_parallel_families: Collection[str] | None = None,
) -> RunModels:
    """The run's models, placed. The caller seeds the generators first: the teacher draws first
    (when random), then the student. A method without a teacher (``needs_teacher`` False) still
    builds it when the student starts from its blocks, then drops it: the same init as the
    distilled students. The models' families are checked against ``model_families`` (the
    method's; split over ranks, ``tensor_parallel_families`` when given), and with
    ``tokenizer`` (the data's), vocabulary, tokenizer and context, before anything is placed
    (whether the tensor-parallel sizes split their heads: as they are sharded). ``teacher_dims`` (default ``dims``): the teacher's own layout
    (``parallel.teacher_tensor_parallel_size``), whose groups gather their batches."""
    copies_blocks = config.student.init == "teacher_layers"
    teacher = build_teacher(config) if needs_teacher or copies_blocks else None
    student = build_student(config, teacher)
    teacher = teacher if needs_teacher else None
    split = config.parallel.tensor_parallel_size > 1 or config.parallel.teacher_apart
    check_families(
        config, teacher, student, model_families, tensor_parallel_families if split else None
    )
    if tokenizer is not None:
        check_compatible(config, tokenizer, teacher, student)
        for model in (teacher, student):
            if model is not None and model.config.vocab_size > len(tokenizer):
                model.vocab_in_use = len(tokenizer)
    pad = config.parallel.tensor_parallel_padding
    if teacher is not None:
        place_teacher(teacher, config, device, compute_dtype, dims, teacher_dims, pad=pad)
    place(student, "student", config, device, compute_dtype, dims, pad=pad)
    layer_map = teacher_layer_map(config, teacher) if teacher is not None else []
    return RunModels(teacher, student, layer_map)


def run_model_shapes(config: RunConfig) -> RunModels:
    """The run's teacher and student on the meta device (shapes only, nothing loaded: a
    pretrained model's shape is read from its ``config.json`` or GPT-2's known hub shapes),
    built by the same constructors; the teacher is always built (the memory estimate counts it)."""
    with torch.device("meta"):
        teacher = GPT(
            pretrained_shape(config.teacher.pretrained)
            if config.teacher.pretrained
            else config.teacher.arch
        )
        if config.student.init == "pretrained":
            shape = pretrained_shape(config.student.pretrained)
            student = GPT(replace(shape, dropout=config.student.dropout))
        else:  # the trainer's constructor: teacher blocks at the layer map, or random
            student = build_student(config, teacher)
    layer_map = teacher_layer_map(config, teacher)
    return RunModels(teacher, student, layer_map)


def check_families(
    config: RunConfig,
    teacher: GPT | None,
    student: GPT,
    model_families: Collection[str],
    split_families: Collection[str] | None = None,
) -> None:
    """Refuse, before anything is placed or trained, a model whose family (``GPTConfig.family``)
    the method does not support yet, naming both; with ``split_families`` (the run splits its
    models over ranks: ``Method.tensor_parallel_families``), also one of the others, naming the
    tensor-parallel key."""
    sources = {
        "teacher": config.teacher.pretrained or "teacher.arch",
        "student": config.student.pretrained or f"student.init={config.student.init}",
    }
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    for role, model in models.items():
        family = model.config.family
        if family not in model_families:
            raise ModelMismatchError(
                f"method={config.method} is implemented for model families "
                f"{', '.join(model_families)} only, and the {role} ({sources[role]}) is family "
                f"{family}"
            )
        if split_families is not None and family not in split_families:
            parallel = config.parallel
            key = (
                f"parallel.teacher_tensor_parallel_size={parallel.teacher_size}"
                if parallel.teacher_apart
                else f"parallel.tensor_parallel_size={parallel.tensor_parallel_size}"
            )
            raise ModelMismatchError(
                f"{key}: method={config.method} runs tensor-parallel on model families "
                f"{', '.join(split_families)} only, and the {role} ({sources[role]}) is family "
                f"{family}; use it unsplit"
            )


def check_compatible(
    config: RunConfig, tokenizer: PreTrainedTokenizerFast, teacher: GPT | None, student: GPT
) -> None:
    """Refuse, before training, a teacher, student and data that do not share one vocabulary.

    A model may have more embedding rows than the tokenizer has tokens (Qwen pads its embedding:
    151,936 rows in Qwen2.5-0.5B, 152,064 in 7B, for 151,665 tokens) only when its folder ships
    the data's tokenizer (a student copied from the teacher's layers: the teacher's folder); the
    losses then run over the tokenizer's ids (``GPT.vocab_in_use``)."""
    data_fp = tokenizer_fingerprint(tokenizer)
    ships: dict[str | None, bool] = {}  # model folder -> ships the data's tokenizer
    for role, source in (
        ("teacher", config.teacher.pretrained),
        ("student", config.student.pretrained),
    ):
        own = folder_tokenizer(source)
        if own is not None and tokenizer_fingerprint(own) != data_fp:
            raise ModelMismatchError(
                f"the {role} in {source} comes with another tokenizer than the data in "
                f"{config.data.path}: teacher, student and data must share one tokenizer"
            )
        ships[source] = own is not None
    # A student copied from the teacher's layers has the teacher's rows.
    copied = config.student.init == "teacher_layers"
    sources = {
        "teacher": config.teacher.pretrained,
        "student": config.teacher.pretrained if copied else config.student.pretrained,
    }
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    for role, model in models.items():
        rows = model.config.vocab_size
        if rows == len(tokenizer) or (rows > len(tokenizer) and ships.get(sources[role], False)):
            continue
        raise ModelMismatchError(
            f"{role} has a vocabulary of {rows} tokens but the data in {config.data.path} was "
            f"tokenised with {len(tokenizer)} (more embedding rows than tokens are accepted only "
            "from a model folder that ships the data's tokenizer)"
        )
    if teacher is not None and student.config.n_positions < teacher.config.n_positions:
        raise ModelMismatchError(
            f"student context {student.config.n_positions} is shorter than the teacher's "
            f"{teacher.config.n_positions}"
        )
