"""Student initialisation: a shallower copy of the teacher, block k taken from teacher block M(k)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ted_scale.model.gpt import GPT


class ModelMismatchError(ValueError):
    """Teacher, student and data do not fit together."""


def set_dropout(model: GPT, p: float) -> None:
    """Set every dropout of ``model`` (embeddings, attention, residual, FFN) to ``p``."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    for block in model.blocks:
        block.attn.attn_dropout = p


def student_from_teacher(
    teacher: GPT, teacher_blocks: Sequence[int], *, dropout: float | None = None
) -> GPT:
    """A student whose block k is a copy of ``teacher.blocks[teacher_blocks[k]]`` (0-based).

    Token and position embeddings (GPT-2), the final norm and an untied LM head are copied too, and
    the config (the family's norms, rotary settings, heads) is the teacher's; the student gets its
    own tensors (nothing is shared with the teacher).
    """
    n = len(teacher.blocks)
    bad = [b for b in teacher_blocks if not 0 <= b < n]
    if bad or not teacher_blocks:
        raise ValueError(
            f"teacher blocks {list(teacher_blocks)} must be non-empty and in 0..{n - 1}"
        )

    def mapped(per_layer: list[int] | None) -> list[int] | None:
        """A pruned teacher's per-block shapes, for the copied blocks."""
        return None if per_layer is None else [per_layer[b] for b in teacher_blocks]

    config = replace(
        teacher.config,
        n_layer=len(teacher_blocks),
        dropout=teacher.config.dropout if dropout is None else dropout,
        n_head_per_layer=mapped(teacher.config.n_head_per_layer),
        n_inner_per_layer=mapped(teacher.config.n_inner_per_layer),
    )
    student = GPT(config, activation_checkpointing=teacher.activation_checkpointing)
    student.set_attention(teacher.blocks[0].attn.implementation)
    with torch.no_grad():
        for name in ("wte", "wpe", "ln_f", "unembed"):
            if getattr(teacher, name) is not None:  # no wpe (RoPE), no unembed (tied head)
                getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
        for k, b in enumerate(teacher_blocks):
            student.blocks[k].load_state_dict(teacher.blocks[b].state_dict())
    return student.to(next(teacher.parameters()).device)
