"""Megatron-style tensor parallelism applied to a ``GPT`` by one function (docs/design.md, "Tensor
parallelism"), with DeepSpeed AutoTP's training layers doing the sharding and the collectives
(``tp_layers``: the same layers, able to run prefix sub-networks):

- ``attn.qkv_proj`` column-parallel by heads: its rows are reordered rank-major
  ([q_0; k_0; v_0; q_1; k_1; v_1; ...]) before the even split, so that rank r holds
  [q_r; k_r; v_r] for its own heads, which is what ``CausalSelfAttention`` reads off its output;
- ``attn.out_proj`` and ``mlp.down_proj`` row-parallel (all-reduce after the matmul);
- ``mlp.up_proj`` column-parallel;
- ``wte`` (and with it the tied LM head) vocabulary-parallel, the vocabulary padded to a multiple
  of 128 x tp as Megatron does; the losses keep the padded ids out (``kernels.VocabShard``);
- LayerNorms and the position embedding replicated;
- with ``pad``, zero heads and FFN neurons where the tensor-parallel size does not divide a
  block's (exact: they compute and receive zeros).

``gathered_state`` undoes all of it: the unsharded state of the original model, for export and
for comparing layouts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ted_scale.kernels.vocab_parallel import VocabShard
from ted_scale.model.gpt import GPT, GPTConfig
from ted_scale.model.tp_layout import (
    ShardedWeight,
    Split,
    TensorParallelLayout,
    split_dim,
    split_groups,
)
from ted_scale.parallel.dims import ParallelDims, ParallelLayoutError, zero3_gathered_state

VOCAB_MULTIPLE = 128
"""The vocabulary is padded to a multiple of this times the tensor-parallel size (Megatron's
``make-vocab-size-divisible-by``), so every rank's shard has the same, aligned size."""

# Each block's projection -> how it is split (``ted_scale.model.tp_layout.Split``).
_LAYOUTS: dict[str, Split] = {
    "attn.qkv_proj": "qkv",
    "attn.out_proj": "row",
    "mlp.up_proj": "column",
    "mlp.down_proj": "row",
}
TP_SPLIT_DIM = {
    "wte.weight": 0,
    **{f"{name}.weight": int(layout == "row") for name, layout in _LAYOUTS.items()},
    **{f"{name}.bias": 0 for name, layout in _LAYOUTS.items() if layout != "row"},
}
"""Parameter name suffix -> the dimension tensor parallelism splits it along (absent: whole)."""


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary a tensor-parallel model holds: rounded up to a multiple of
    ``VOCAB_MULTIPLE * tp_size`` (tp 1 keeps it: the unsharded model is unchanged)."""
    if tp_size == 1:
        return vocab_size
    multiple = VOCAB_MULTIPLE * tp_size
    return math.ceil(vocab_size / multiple) * multiple


def check_shardable(config: GPTConfig, tp_size: int, role: str) -> None:
    """Raise ParallelLayoutError naming the model, block and width that ``tp_size`` does not
    divide (heads and FFN width; the vocabulary is always padded)."""
    for layer, (heads, inner) in enumerate(
        zip(config.layer_heads, config.layer_inner, strict=True)
    ):
        for what, n in (("attention heads", heads), ("FFN width", inner)):
            if n % tp_size:
                raise ParallelLayoutError(
                    f"parallel.tensor_parallel_size={tp_size} does not divide the {role}'s "
                    f"{what} in block {layer} ({n}): Megatron's scheme splits whole heads and "
                    "neurons over the ranks. Choose a tensor-parallel size that divides them, or "
                    "set parallel.tensor_parallel_padding: true to add zero heads and neurons "
                    f"up to the next multiple of {tp_size} (exact, at their extra compute)"
                )


def padded_width(n: int, tp_size: int) -> int:
    """Heads or FFN neurons a block holds under tensor parallelism with padding: ``n`` rounded
    up to a multiple of ``tp_size``."""
    return -(-n // tp_size) * tp_size


def tensor_parallel_sum(local: Tensor, layout: TensorParallelLayout | None) -> Tensor:
    """The sum over the layout's group of a per-rank scalar (a loss over this rank's heads), with
    the gradient of that sum reaching each rank's own term (sum forward, identity backward)."""
    if layout is None:
        return local
    from deepspeed.module_inject.layers import RowParallel

    return RowParallel.apply(layout.group, local, False)


class ShardedDropoutRNG:
    """The RNG stream of dropout inside a sharded region (each rank's attention heads), as
    Megatron gives one: rank r draws its masks from a generator seeded with key + r.

    key is drawn from the default CPU generator, which every rank of the group holds in the same
    state (same seed, same draws), so the ranks' default streams, and with them the replicated
    regions' masks, stay in step; activation checkpointing restores the default state before it
    recomputes, so the recomputation draws the same key and the same masks; and there is no
    state of its own to checkpoint. Entered only when dropout is on: with dropout 0 the streams,
    and the losses, are those of one process.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @contextmanager
    def __call__(self) -> Iterator[None]:
        key = int(torch.randint(2**62, (1,)))
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):  # both default states restored on exit
            torch.default_generator.manual_seed(key + self.rank)
            if cuda:
                torch.cuda.manual_seed(key + self.rank)
            yield


def parallelize_gpt(
    model: GPT, dims: ParallelDims, role: str, *, pad: bool = False, gathers_batch: bool = False
) -> None:
    """Shard ``model`` in place over ``dims.tp_group`` (nothing to do at tp = 1).

    Every rank of the group must hold the same full weights on entry (same seed or same
    checkpoint); each keeps its shards on ``dims.device``. With ``pad``, blocks whose heads or
    FFN width ``dims.tp_size`` does not divide get zero heads and neurons
    (``pad_for_tensor_parallel``). ``gathers_batch``: the group's ranks read different
    micro-batches (a frozen teacher split apart from its student): the model keeps its whole head
    too (``TensorParallelLayout.whole_head``).
    """
    if dims.tp_size == 1:
        return
    from deepspeed.module_inject.layers import VocabParallelEmbedding, set_autotp_mode

    from ted_scale.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

    if not pad:
        check_shardable(model.config, dims.tp_size, role)
    set_autotp_mode(training=True)  # all-reduces with autograd (the frozen teacher is harmless)
    group, tp = dims.tp_group, dims.tp_size
    frozen = not any(p.requires_grad for p in model.parameters())
    kept = [_split_widths(block) for block in model.blocks]
    if pad:
        pad_for_tensor_parallel(model, tp)
    modules: dict[str, ShardedWeight] = {}
    for i, (block, widths) in enumerate(zip(model.blocks, kept, strict=True)):
        _reorder_rank_major(block.attn.qkv_proj, tp)
        block.attn.dropout_rng = ShardedDropoutRNG(dims.tp_rank)
        for name, split in _LAYOUTS.items():
            parent, attr = _resolve(block, name)
            layer = (RowParallelLinear if split == "row" else ColumnParallelLinear)(
                getattr(parent, attr), group
            )
            modules[f"blocks.{i}.{name}"] = ShardedWeight(split, widths[name])
            layer.groups = split_groups(split)
            setattr(parent, attr, layer)
    vocab, weight = model.config.vocab_size, model.wte.weight.detach()
    rows = weight.new_zeros(padded_vocab_size(vocab, tp), weight.shape[1])
    rows[:vocab] = weight
    # Built around the padded rows: no random initialisation, so the RNG stream (and what is
    # initialised after this, e.g. LWD's projections) is the same at every tensor-parallel size.
    padded = nn.Embedding(rows.shape[0], rows.shape[1], _weight=rows)
    model.wte = VocabParallelEmbedding(padded, group)
    modules["wte"] = ShardedWeight("vocab", vocab)
    # Rows past the tokenizer's ids (``GPT.vocab_in_use``) count as padding too.
    tokens = model.vocab_in_use or vocab
    shard = VocabShard(group=group, start=model.wte.vocab_start_index, vocab_size=tokens)
    whole_head = None
    if gathers_batch:
        if not frozen:
            raise ValueError(f"gathers_batch is for a frozen model; the {role} trains")
        whole_head = weight[:vocab].to(model.wte.weight.device).clone()
    model.tensor_parallel = TensorParallelLayout(
        group, dims.tp_rank, tp, shard, modules, whole_head
    )
    model.requires_grad_(not frozen)


def _split_widths(block: nn.Module) -> dict[str, int]:
    """Each projection's real width along its split, per group."""
    widths = {}
    for name, split in _LAYOUTS.items():
        widths[name] = block.get_submodule(name).weight.shape[split_dim(split)] // split_groups(
            split
        )
    return widths


@torch.no_grad()
def pad_for_tensor_parallel(model: GPT, tp: int) -> None:
    """Give every block zero heads and FFN neurons, after the real ones, up to multiples of
    ``tp`` (in place; meta-device models too).

    A zero head has zero q, k and v (it attends uniformly to zero values) and zero ``out_proj``
    columns; a zero neuron's activation is gelu(0) = 0 and its ``down_proj`` column is zero. Their
    outputs and every gradient reaching them are exactly zero, so they stay zero under the
    optimizer and the padded model computes and trains exactly as the original.
    """
    for block in model.blocks:
        head_dim = block.attn.head_dim
        heads = block.attn.qkv_proj.out_features // (3 * head_dim)
        attn_width = padded_width(heads, tp) * head_dim
        mlp_width = padded_width(block.mlp.up_proj.out_features, tp)
        for name, width in (
            ("attn.qkv_proj", attn_width),
            ("attn.out_proj", attn_width),
            ("mlp.up_proj", mlp_width),
            ("mlp.down_proj", mlp_width),
        ):
            linear, split = block.get_submodule(name), _LAYOUTS[name]
            dim, groups = split_dim(split), split_groups(split)
            trainable = linear.weight.requires_grad
            weight = _zero_extend(linear.weight, dim, groups, width)
            linear.weight = nn.Parameter(weight, requires_grad=trainable)
            if dim == 0:
                bias = _zero_extend(linear.bias, 0, groups, width)
                linear.bias = nn.Parameter(bias, requires_grad=trainable)
            linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]


def _zero_extend(t: Tensor, dim: int, groups: int, width: int) -> Tensor:
    """``t`` with each of its ``groups`` along ``dim`` extended by zeros to ``width``."""
    parts = t.unflatten(dim, (groups, -1))
    shape = list(parts.shape)
    shape[dim + 1] = width
    out = parts.new_zeros(shape)
    out.narrow(dim + 1, 0, parts.shape[dim + 1]).copy_(parts)
    return out.flatten(dim, dim + 1)


def _crop(t: Tensor, dim: int, groups: int, width: int) -> Tensor:
    """``_zero_extend`` undone: the first ``width`` of each of ``groups`` along ``dim``."""
    return t.unflatten(dim, (groups, -1)).narrow(dim + 1, 0, width).flatten(dim, dim + 1)


def _resolve(block: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, attr = dotted.rpartition(".")
    return block.get_submodule(parent), attr


def _qkv_order(n_rows: int, tp: int) -> Tensor:
    """Row order taking [q; k; v] (each ``n_rows / 3`` rows, head by head) to rank-major
    [q_0; k_0; v_0; q_1; ...], where part r holds 1/tp of each of q, k and v."""
    per_rank = n_rows // 3 // tp
    return torch.arange(n_rows).view(3, tp, per_rank).transpose(0, 1).reshape(-1)


@torch.no_grad()
def _reorder_rank_major(qkv: nn.Linear, tp: int) -> None:
    order = _qkv_order(qkv.weight.shape[0], tp).to(qkv.weight.device)
    qkv.weight.copy_(qkv.weight[order])
    qkv.bias.copy_(qkv.bias[order])


def _gather(shard: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gathered_state(module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict of ``module``, fp32 on the CPU, under the names of the
    unsharded module: the tensor-parallel shards of every sharded ``GPT`` inside it and ZeRO-3
    partitions gathered.

    A collective over the tensor-parallel group (and under ZeRO-3 the world): every rank calls
    it, every rank gets the whole state.
    """
    split: dict[str, tuple[ShardedWeight, TensorParallelLayout]] = {}
    for prefix, m in module.named_modules():
        if isinstance(m, GPT) and m.tensor_parallel is not None:
            dot = f"{prefix}." if prefix else ""
            for name, sharded in m.tensor_parallel.modules.items():
                split[dot + name] = (sharded, m.tensor_parallel)
    if not split:
        return zero3_gathered_state(module)
    state = {}
    for name, tensor in module.state_dict().items():
        owner, _, kind = name.rpartition(".")
        if owner in split:
            tensor = _unshard(*split[owner], kind, tensor)
        state[name] = tensor
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def unsharded_copy(model: GPT) -> GPT:
    """A plain, whole copy of ``model`` on its device: gathered from the tensor-parallel shards
    (a collective: every rank of the group calls it; padding removed), else a deep copy."""
    if model.tensor_parallel is None:
        return copy.deepcopy(model)
    state = gathered_state(model)
    with torch.device("meta"):  # no initialisation: the RNG stream is left as it is
        whole = GPT(model.config, activation_checkpointing=model.activation_checkpointing)
    whole.load_state_dict(state, assign=True)
    whole.vocab_in_use = model.vocab_in_use
    whole.set_attention(model.blocks[0].attn.implementation if model.blocks else "auto")
    param = next(model.parameters())
    return (
        whole.to(param.device, param.dtype)
        .train(model.training)
        .requires_grad_(param.requires_grad)
    )


def _unshard(
    sharded: ShardedWeight, layout: TensorParallelLayout, kind: str, tensor: Tensor
) -> Tensor:
    """The whole ``kind`` ("weight" or "bias") tensor of a split module from its shards, without
    the padded rows or columns."""
    if sharded.split == "row" and kind != "weight":
        return tensor  # the bias is replicated
    dim = split_dim(sharded.split)
    full = _gather(tensor, dim, layout.group)
    if sharded.split == "qkv":
        full = full[torch.argsort(_qkv_order(full.shape[0], layout.size))]
    return _crop(full, dim, split_groups(sharded.split), sharded.kept)
