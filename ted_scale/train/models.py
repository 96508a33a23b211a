"""Teacher, student and tokenizer as the run configuration describes them, checked against each
other before any training starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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
    """The frozen teacher: a pretrained HF GPT-2 or, with ``teacher.pretrained: null``, random."""
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


def compile_models(config: RunConfig, device: torch.device, *models: GPT | None) -> None:
    """Compile the blocks of every model given when ``model.compile`` says so on ``device``."""
    if compile_enabled(config.model.compile, device):
        for model in models:
            if model is not None:
                compile_blocks(model)


def check_compatible(
    config: RunConfig, tokenizer: PreTrainedTokenizerFast, teacher: GPT | None, student: GPT
) -> None:
    """Refuse, before training, a teacher, student and data that do not share one vocabulary."""
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    for role, model in models.items():
        if model.config.vocab_size != len(tokenizer):
            raise ModelMismatchError(
                f"{role} has a vocabulary of {model.config.vocab_size} tokens but the data in "
                f"{config.data.path} was tokenised with {len(tokenizer)}"
            )
    data_fp = tokenizer_fingerprint(tokenizer)
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
    if teacher is not None and student.config.n_positions < teacher.config.n_positions:
        raise ModelMismatchError(
            f"student context {student.config.n_positions} is shorter than the teacher's "
            f"{teacher.config.n_positions}"
        )
