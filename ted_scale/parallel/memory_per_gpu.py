"""GPU memory per rank of a distillation step, counted from the models' shapes and the layout.

Each rank of a (dp, tp) layout (docs/design.md, "Tensor parallelism: memory per GPU") holds:

- the frozen teacher, sharded like the student, in the storage dtype (bf16 under bf16);
- the student's weights and gradients in fp32 (``torch.autocast`` with fp32 master weights), and
  the optimizer's state: AdamW's m and v (8 bytes per weight) and, under ZeRO 1-3, DeepSpeed's
  fp32 copy of the partition it steps (4 bytes), divided by dp; ZeRO-2 also partitions the
  gradients and ZeRO-3 the weights;
- the bf16 copies autocast makes of every trained weight for one forward/backward (2 bytes each);
- DeepSpeed's contiguous gradient-reduction bucket (ZeRO 1 and 2: ``reduce_bucket_size`` fp32,
  allocated at the first gradient of each backward pass, when the activations are still held);
- the modules a method adds: frozen ones (TED's teacher filters, storage dtype) and trained ones
  (student filters, projections: fp32, with gradients and AdamW state like the student's);
  replicated over the tensor-parallel group;
- the activations autograd saves for one micro-batch (see :func:`block_activation_bytes`).

The estimate of a whole run configuration (its models built on the meta device, the check before
a run starts) is ``ted_scale.train.memory_check``; this module is the arithmetic.

Sharding (Megatron's): ``attn.qkv_proj`` (by heads; with fewer key/value heads than ranks, a copy
of one on each rank), ``mlp.gate_proj`` and ``mlp.up_proj`` are column-parallel (weight and bias
split), ``attn.out_proj`` and ``mlp.down_proj`` row-parallel (weight split, bias replicated), the
token embedding (= tied LM head) and an untied LM head vocabulary-parallel over a vocabulary
padded to a multiple of 128 x tp; position embeddings and norms are replicated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ted_scale.model.gpt import GPT, CausalSelfAttention, GPTConfig
from ted_scale.parallel.tensor import (
    TEACHER_TP_SIZE_KEY,
    TP_SIZE_KEY,
    TP_SPLIT_DIM,
    VOCAB_PARALLEL_WEIGHTS,
    check_shardable,
    pad_for_tensor_parallel,
    padded_vocab_size,
    qkv_rows_per_rank,
)

FP32 = 4
MASK = 1  # a dropout mask is one bool byte per element
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default ``reduce_bucket_size`` (elements)
GIB = 2**30


def meta_gpt(config: GPTConfig) -> GPT:
    """A ``GPT`` of shape ``config`` on the meta device: its parameters have shapes, no memory."""
    with torch.device("meta"):
        return GPT(config)


def params_per_rank(model: nn.Module, tp: int) -> int:
    """Parameters one tensor-parallel rank of ``model`` holds (a ``GPT`` or filters made of its
    blocks and linears; build it on the meta device to count without memory).

    Split tensors hold 1/tp of their (vocabulary-padded) rows or columns, ``qkv_proj`` its query
    heads' rows and its key/value heads' (``qkv_rows_per_rank``: a whole copy of one where the
    ranks outnumber them); the rest is whole.
    """
    qkv_rows = {
        p: qkv_rows_per_rank(attn, tp)
        for attn in model.modules()
        if isinstance(attn, CausalSelfAttention)
        for p in attn.qkv_proj.parameters()
    }
    total = 0
    for name, p in model.named_parameters():
        dim = next((d for suffix, d in TP_SPLIT_DIM.items() if name.endswith(suffix)), None)
        shape = list(p.shape)
        if p in qkv_rows:
            shape[0] = qkv_rows[p]
        elif dim is not None and tp > 1:
            if name.endswith(VOCAB_PARALLEL_WEIGHTS):
                shape[0] = padded_vocab_size(shape[0], tp)
            if shape[dim] % tp:
                raise ValueError(
                    f"{name}: dimension {dim} of {tuple(p.shape)} is not divisible by {tp}"
                )
            shape[dim] //= tp
        total += math.prod(shape)
    return total


@dataclass(frozen=True)
class Layout:
    """How a run is laid out and batched; the sizes the estimate depends on."""

    tp: int = 1
    dp: int = 1
    zero_stage: int = 1
    micro_batch: int = 8
    seq_len: int = 1024
    compute_bytes: int = 2
    """2 under bf16 autocast (matmul inputs, frozen weights), 4 under fp32."""
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    padding: bool = False
    """Zero heads and neurons pad widths tp does not divide (``parallel.tensor_parallel_padding``)."""
    flash_attention: bool = True
    """The attention kernel keeps no T x T matrix (flash-attn, SDPA); False: the eager softmax."""
    offload_optimizer: bool = False
    reduce_bucket: int = DEEPSPEED_REDUCE_BUCKET
    teacher_tp: int | None = None
    """The teacher's own tensor-parallel size when it is split apart from the student
    (``parallel.teacher_tensor_parallel_size``; the student at ``tp``, then 1); None: ``tp``."""

    @property
    def teacher_apart(self) -> bool:
        return self.teacher_tp is not None and self.teacher_tp != self.tp


def block_activation_bytes(
    config: GPTConfig, layout: Layout, *, heads: int | None = None, inner: int | None = None
) -> int:
    """Bytes autograd saves in one block's forward of a model of shape ``config`` for one
    micro-batch, on one rank; ``heads`` and ``inner`` are the block's own (a pruned or padded
    block's; default ``config``'s).

    Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer models",
    Eq. 2) count ``s b h (34 + 5 a s / h)`` bytes per GPT block: ``10 s b h`` in the LayerNorm /
    dropout regions (replicated under tensor parallelism, split by tp under sequence
    parallelism), ``24 s b h`` inside attention and MLP (split by tp), ``5 a s^2 b`` for the
    attention matrix (split by tp; absent under flash attention, which saves only a log-sum-exp
    per row). This model's terms, with c = compute bytes and s b = tokens of the micro-batch:

    - replicated: what the two norms save (``_norm_bytes``) and their outputs as the projections'
      inputs (``_norm_region_bytes``), dropout masks 2 x 1 per width;
    - split: q, k, v 3c and the attention output c per attention width (heads x head_dim; k and
      v enter the kernel repeated to every query head, so grouped-query attention saves weights
      here, not activations), Qwen3's q/k norms, and the FFN: GELU's input and output 2c per FFN
      width, or SwiGLU's gate, silu(gate), up and their product 4c;
    - attention matrix: softmax output c, dropout mask 1 and output c per head and key (eager),
      or a fp32 log-sum-exp per head (flash).

    The rotary tables (cos and sin [T, head_dim], whatever the batch) are left out.
    """
    t = layout.tp
    sp = t if layout.sequence_parallel else 1
    tokens = layout.micro_batch * layout.seq_len
    c, dropout = layout.compute_bytes, config.dropout > 0
    mask = MASK if dropout else 0
    heads = config.n_head if heads is None else heads
    width = heads * config.head_dim
    inner = config.layer_inner[0] if inner is None else inner
    split = 4 * c * width + (4 if config.llama_like else 2) * c * inner
    if config.qk_norm:  # each of q and k: a fp32 copy, the normalised product (c), 1/rms per head
        kv_heads = heads * config.kv_heads // config.n_head
        split += (FP32 + c) * (heads + kv_heads) * config.head_dim + FP32 * (heads + kv_heads)
    if layout.flash_attention:
        scores = FP32 * heads
    else:
        scores = (c + mask + (c if dropout else 0)) * heads * layout.seq_len
    replicated = _norm_region_bytes(config, c) + 2 * mask * config.n_embd
    return tokens * replicated // sp + tokens * (split + scores) // t


def _norm_bytes(config: GPTConfig) -> int:
    """Bytes one norm of the residual stream saves per token: LayerNorm its fp32 input, mean and
    inverse deviation; RMSNorm its fp32 input, 1/rms and the fp32 normalised input that its
    weight multiplies."""
    d = config.n_embd
    return 2 * FP32 * d + FP32 if config.llama_like else FP32 * d + 2 * FP32


def _norm_region_bytes(config: GPTConfig, c: int) -> int:
    """Per token, a block's two norms and their outputs as the projections' inputs: under
    autocast each projection casts its own copy (c bytes; SwiGLU's gate and up one each), in
    fp32 the projections share the output (4 bytes)."""
    copies = 3 if config.llama_like and c < FP32 else 2
    return 2 * _norm_bytes(config) + copies * c * config.n_embd


@dataclass
class MemoryEstimate:
    """Bytes per GPU by component, in the order printed."""

    layout: Layout
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _trained_bytes(n: int, layout: Layout) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes of ``n`` trained fp32 weights on one rank."""
    dp, stage = layout.dp, layout.zero_stage
    weights = FP32 * n // (dp if stage >= 3 else 1)
    grads = FP32 * n // (dp if stage >= 2 else 1)
    # AdamW's m and v; ZeRO steps an fp32 copy of its partition beside them.
    optimizer = (
        0 if layout.offload_optimizer else (2 * FP32 * n if stage == 0 else 3 * FP32 * n // dp)
    )
    return weights, grads, optimizer


def estimate_memory(
    teacher: nn.Module,
    student: nn.Module,
    layout: Layout,
    *,
    frozen_modules: nn.Module | None = None,
    trained_modules: nn.Module | None = None,
    tapped_layers: int = 0,
    kd: bool = True,
    teacher_ahead: bool = False,
) -> MemoryEstimate:
    """Bytes per GPU of a distillation step (Stage II, the larger one) of ``student`` from the
    frozen ``teacher`` (both ``GPT``: ``meta_gpt(config)`` builds one from a ``GPTConfig``) with
    the modules the method adds, at ``layout``: ``frozen_modules`` (TED's teacher filters) and
    ``trained_modules`` (its student filters, LWD's projections, CR-ILD's fit layer), each whole
    on every tensor-parallel rank.

    Activations are the student's: its blocks, embeddings and head (all blocks at once, or under
    activation checkpointing each block's fp32 input plus one block recomputed), and per tapped
    layer (``tapped_layers``: the student layers the layer term compares) the trained module's
    saved input (c) and the fp32 difference the squared
    error saves (4), per token and width. The teacher's outputs held for the loss are its filtered
    state per tapped layer and, with ``kd``, its final hidden state (c each), twice with
    ``teacher_ahead`` (prefetch computes the next micro-batch's during this one). The teacher's
    forward runs without autograd and keeps one block's intermediates at a time (not counted).
    A teacher split apart (``layout.teacher_tp``) holds 1/teacher_tp of its split weights plus
    its whole head; its forward on the group's gathered batch is transient (not counted).
    """
    tp, c = layout.tp, layout.compute_bytes
    t_tp = layout.teacher_tp if layout.teacher_apart else tp
    if layout.padding:
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    t_key = TEACHER_TP_SIZE_KEY if layout.teacher_apart else TP_SIZE_KEY
    for name, model, size, key in (
        ("teacher", teacher, t_tp, t_key),
        ("student", student, tp, TP_SIZE_KEY),
    ):
        if layout.padding:
            pad_for_tensor_parallel(model, size)
        else:
            check_shardable(model.config, size, name, key)
    n_student = params_per_rank(student, tp)
    # A method's modules stay whole on every tensor-parallel rank (block filters too).
    n_frozen = 0 if frozen_modules is None else params_per_rank(frozen_modules, 1)
    n_trained = 0 if trained_modules is None else params_per_rank(trained_modules, 1)
    weights, grads, optimizer = _trained_bytes(n_student, layout)
    m_weights, m_grads, m_optimizer = _trained_bytes(n_trained, layout)

    cfg = student.config
    dropout = cfg.dropout > 0
    blocks = [
        block_activation_bytes(
            cfg,
            layout,
            heads=block.attn.query_heads(block.attn.qkv_proj.out_features),  # padded ones too
            inner=block.mlp.up_proj.out_features,
        )
        for block in student.blocks
    ]
    tokens = layout.micro_batch * layout.seq_len
    sp = tp if layout.sequence_parallel else 1
    if layout.activation_checkpointing:
        student_acts = len(blocks) * FP32 * tokens * cfg.n_embd // sp + max(blocks, default=0)
    else:
        student_acts = sum(blocks)
    # Embedding dropout mask, the final norm and the LM head's input.
    top = ((MASK if dropout else 0) + c) * cfg.n_embd + _norm_bytes(cfg)
    student_acts += top * tokens // sp
    d_t = teacher.config.n_embd
    student_acts += tapped_layers * (c + FP32) * tokens * d_t
    teacher_outputs = (
        (tapped_layers + (1 if kd else 0)) * c * tokens * d_t * (2 if teacher_ahead else 1)
    )

    teacher_weights = c * params_per_rank(teacher, t_tp)
    if layout.teacher_apart:  # its whole head beside the shards, for the student's losses
        teacher_weights += c * teacher.config.vocab_size * d_t
    estimate = MemoryEstimate(layout)
    estimate.parts = {
        "teacher weights (frozen)": teacher_weights,
        "student weights (fp32)": weights,
        "student gradients (fp32)": grads,
        "optimizer (fp32 copy + AdamW m, v)": optimizer,
        "method's modules (frozen, trained)": c * n_frozen + m_weights + m_grads + m_optimizer,
        "bf16 weight copies (autocast)": c * (n_student + n_trained) if c < FP32 else 0,
        "ZeRO gradient bucket (fp32)": FP32 * layout.reduce_bucket
        if layout.zero_stage in (1, 2)
        else 0,
        "student activations (one micro-batch)": student_acts,
        "teacher outputs for the loss": teacher_outputs,
    }
    return estimate


def largest_micro_batch(estimate: MemoryEstimate, estimate_at, gpu_bytes: float) -> int:
    """The largest micro-batch whose estimate fits in ``gpu_bytes`` at ``estimate``'s layout
    (activations grow linearly with it); ``estimate_at(layout)`` re-estimates a layout."""
    fixed = estimate_at(replace(estimate.layout, micro_batch=0)).total
    per_sample = estimate_at(replace(estimate.layout, micro_batch=1)).total - fixed
    return max(int((gpu_bytes - fixed) // per_sample), 0)


def format_table(estimates: list[MemoryEstimate], extra_rows: dict[str, list[str]]) -> str:
    """A Markdown table: one column per estimate (GiB per GPU), the total, then ``extra_rows``."""

    def head(e: MemoryEstimate) -> str:
        lay = e.layout
        teacher = f" teacher tp={lay.teacher_tp}" if lay.teacher_apart else ""
        return f"tp={lay.tp} dp={lay.dp}{teacher}" + (" sp" if lay.sequence_parallel else "")

    lines = [
        "| GiB per GPU | " + " | ".join(head(e) for e in estimates) + " |",
        "|---|" + "---:|" * len(estimates),
    ]
    rows = {part: [f"{e.parts[part] / GIB:.1f}" for e in estimates] for part in estimates[0].parts}
    rows["**total**"] = [f"**{e.total / GIB:.1f}**" for e in estimates]
    for name, cells in {**rows, **extra_rows}.items():
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
