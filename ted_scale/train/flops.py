"""FLOPs per token of every piece of a training step, and the peak rates MFU is measured against.

Counting convention (as in the PaLM/Megatron papers): a matmul of [m, k] x [k, n] costs 2mkn FLOPs;
a backward pass costs twice its forward (gradients for inputs and weights). Per token, with width
d, L blocks, context T and vocabulary V:

- one block's forward: 24 d^2 (qkv 6d^2, attention output 2d^2, MLP 16d^2)
  + 4 T d / 2 (causal attention scores and values, half of the T x T square is masked)
- the LM head forward: 2 V d
- a linear filter d_in -> d_out: 2 d_in d_out; an MLP filter: 2 d_in h + 2 h d_out; block filters
  count as blocks.

The frozen teacher and its frozen filters run forward only (1x); the student, its filters and every
trained head run forward and backward (3x). Stage I trains filters on a frozen model: the model's
forward is 1x, the filters and their heads 3x; heads whose weight is frozen still need the input
gradient, counted as a full backward for simplicity (a 2x-vs-3x difference on one matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
}


def block_flops(d: int, seq_len: int) -> float:
    """Forward FLOPs per token of one transformer block."""
    return 24 * d * d + 2 * seq_len * d


def model_forward_flops(
    n_layer: int, d: int, vocab: int, seq_len: int, *, with_head: bool
) -> float:
    return n_layer * block_flops(d, seq_len) + (2 * vocab * d if with_head else 0)


@dataclass(frozen=True)
class FilterShape:
    arch: str
    d_in: int
    d_out: int
    n_blocks: int = 0  # block filters
    hidden: int = 0  # mlp filters

    def forward_flops(self, seq_len: int) -> float:
        if self.arch == "linear":
            return 2 * self.d_in * self.d_out
        if self.arch == "mlp":
            return 2 * self.d_in * self.hidden + 2 * self.hidden * self.d_out
        return self.n_blocks * block_flops(self.d_in, seq_len)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token of one training step, split by who does the work."""

    teacher: float
    student: float
    filters: float
    heads: float

    @property
    def total(self) -> float:
        return self.teacher + self.student + self.filters + self.heads


def step_flops(
    *,
    method: str,
    seq_len: int,
    vocab: int,
    student: tuple[int, int],
    teacher: tuple[int, int] | None = None,
    teacher_filters: list[FilterShape] = (),
    student_filters: list[FilterShape] = (),
    kd: bool = False,
) -> StepFlops:
    """Per-token FLOPs of a Stage II (or ``lm``) step. ``student``/``teacher`` are (n_layer, d)."""
    n_s, d_s = student
    student_part = 3 * model_forward_flops(n_s, d_s, vocab, seq_len, with_head=False)
    heads = 3 * 2 * vocab * d_s  # the student's own LM head
    teacher_part = 0.0
    if teacher is not None and method != "lm":
        n_t, d_t = teacher
        # The teacher runs its LM head only for KD (and TED-KL's filter heads).
        teacher_part = model_forward_flops(n_t, d_t, vocab, seq_len, with_head=False)
        if kd:
            teacher_part += 2 * vocab * d_t
    filters = sum(f.forward_flops(seq_len) for f in teacher_filters)
    filters += 3 * sum(f.forward_flops(seq_len) for f in student_filters)
    if method == "ted_kl":
        teacher_part += len(teacher_filters) * 2 * vocab * teacher[1]
        heads += len(student_filters) * 3 * 2 * vocab * d_s
    return StepFlops(teacher_part, student_part, filters, heads)


def stage1_flops(
    *, seq_len: int, vocab: int, model: tuple[int, int], filters: list[FilterShape], top_layer: int
) -> StepFlops:
    """Per-token FLOPs of a Stage I step: the frozen model up to ``top_layer``, trained filters."""
    _, d = model
    frozen = (top_layer + 1) * block_flops(d, seq_len)
    return StepFlops(
        teacher=frozen,
        student=0.0,
        filters=3 * sum(f.forward_flops(seq_len) for f in filters),
        heads=len(filters) * 3 * 2 * vocab * d,
    )


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of this GPU, or None (CPU, or a GPU not in the table: no MFU reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(word in name for word in key.split()):
            return PEAK_BF16_TFLOPS[key]
    if "H100" in name:
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None
