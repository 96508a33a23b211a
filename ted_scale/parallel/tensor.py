"""Megatron-style tensor parallelism applied to a ``GPT`` by one function (docs/design.md, "Tensor
parallelism"), with DeepSpeed AutoTP's training layers doing the sharding and the collectives
(``tp_layers``: the same layers, able to run prefix sub-networks):

- ``attn.qkv_proj`` column-parallel by heads: its rows are reordered rank-major
  ([q_0; k_0; v_0; q_1; k_1; v_1; ...]) before the even split, so that rank r holds
  [q_r; k_r; v_r] for its own heads, which is what ``CausalSelfAttention`` reads off its output.
  Grouped-query attention over more ranks than key/value heads: each rank holds its query heads
  and a copy of the one key/value head they use (``KVReplicatedLinear``), whose gradient is
  summed over the ranks holding that head;
- ``attn.out_proj`` and ``mlp.down_proj`` row-parallel (all-reduce after the matmul);
- ``mlp.up_proj`` (and SwiGLU's ``mlp.gate_proj``) column-parallel;
- ``wte`` (and with it the tied LM head) and an untied LM head (``unembed``)
  vocabulary-parallel, the vocabulary padded to a multiple of 128 x tp as Megatron does; the
  losses keep the padded ids out (``kernels.VocabShard``);
- norms and the position embedding replicated; Qwen3's q/k norms too, each one weight that
  every head uses, so each rank's heads give part of its gradient: summed over the group;
- with ``pad``, zero heads (whole zero key/value groups) and FFN neurons where the
  tensor-parallel size does not split a block's (exact: they compute and receive zeros).

``gathered_state`` undoes all of it: the unsharded state of the original model, for export and
for comparing layouts.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ted_scale.kernels.vocab_parallel import VocabShard
from ted_scale.model.gpt import GPT, CausalSelfAttention, GPTConfig
from ted_scale.model.tp_layout import ShardedWeight, Split, TensorParallelLayout, split_dim
from ted_scale.parallel.dims import ParallelDims, ParallelLayoutError, zero3_gathered_state

VOCAB_MULTIPLE = 128
"""The vocabulary is padded to a multiple of this times the tensor-parallel size (Megatron's
``make-vocab-size-divisible-by``), so every rank's shard has the same, aligned size."""

# The options that set a model's tensor-parallel size: shared by teacher and student, or the
# teacher's alone (split apart from its student); refusals name them.
TP_SIZE_KEY = "parallel.tensor_parallel_size"
TEACHER_TP_SIZE_KEY = "parallel.teacher_tensor_parallel_size"

# Each block's projection -> how it is split (``ted_scale.model.tp_layout.Split``).
_LAYOUTS: dict[str, Split] = {
    "attn.qkv_proj": "qkv",
    "attn.out_proj": "row",
    "mlp.gate_proj": "column",  # SwiGLU (the Llama family); GPT-2 has none
    "mlp.up_proj": "column",
    "mlp.down_proj": "row",
}
VOCAB_PARALLEL_WEIGHTS = ("wte.weight", "unembed.weight")
"""The token embedding and the untied LM head: split by vocabulary rows, padded."""
TP_SPLIT_DIM = {
    **dict.fromkeys(VOCAB_PARALLEL_WEIGHTS, 0),
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


def kv_split(kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(key/value heads per rank, ranks holding a copy of each) of a block's ``kv_heads`` over
    ``tp_size`` ranks: split like the query heads where ``tp_size`` divides them, else one whole
    copy per rank (``tp_size`` is then a multiple of them: ``check_shardable``)."""
    if kv_heads % tp_size == 0:
        return kv_heads // tp_size, 1
    return 1, tp_size // kv_heads


def _splits_heads(heads: int, kv_heads: int, tp_size: int) -> bool:
    """Whether ``tp_size`` ranks can share out a block's heads: the same number of whole query
    heads each, using key/value heads of their own (``tp_size`` divides them) or one shared
    key/value head (``tp_size`` a multiple of them: then a rank's query heads all use one)."""
    return heads % tp_size == 0 and (kv_heads % tp_size == 0 or tp_size % kv_heads == 0)


def check_shardable(config: GPTConfig, tp_size: int, role: str, key: str = TP_SIZE_KEY) -> None:
    """Raise ParallelLayoutError naming ``key`` (the option setting ``tp_size``), the model, the
    block and the width that ``tp_size`` ranks cannot split (query heads, key/value heads, FFN
    width; the vocabulary is always padded)."""
    groups = config.kv_groups
    for layer, (heads, inner) in enumerate(
        zip(config.layer_heads, config.layer_inner, strict=True)
    ):
        kv_heads = heads // groups
        padded_heads = padded_kv_heads(kv_heads, groups, tp_size)
        if heads % tp_size:
            what, n, padded = "attention heads", heads, padded_heads * groups
            why = ": Megatron's scheme splits whole heads and neurons over the ranks"
        elif not _splits_heads(heads, kv_heads, tp_size):
            what, n, padded = "key/value heads", kv_heads, padded_heads
            why = (
                f", nor is it a multiple of them: each rank's {heads // tp_size} query heads need "
                "whole key/value heads of their own or one key/value head shared with other ranks"
            )
        elif inner % tp_size:
            what, n, padded = "FFN width", inner, padded_width(inner, tp_size)
            why = ": Megatron's scheme splits whole heads and neurons over the ranks"
        else:
            continue
        raise ParallelLayoutError(
            f"{key}={tp_size} does not divide the {role}'s {what} in block {layer} ({n}){why}. "
            "Choose a tensor-parallel size that splits them, or set "
            f"parallel.tensor_parallel_padding: true to add zero heads and neurons ({n} -> "
            f"{padded} {what}; exact, at their extra compute)"
        )


def padded_width(n: int, tp_size: int) -> int:
    """FFN neurons a block holds under tensor parallelism with padding: ``n`` rounded up to a
    multiple of ``tp_size``."""
    return -(-n // tp_size) * tp_size


def padded_kv_heads(kv_heads: int, groups: int, tp_size: int) -> int:
    """Key/value heads a block holds under tensor parallelism with padding: the fewest, from
    ``kv_heads`` up, whose heads ``tp_size`` ranks can share out, each one added a zero key/value
    head with its ``groups`` zero query heads (GPT-2, ``groups`` 1: the heads rounded up to a
    multiple of ``tp_size``). Zero query heads in a real key/value head's group would attend to
    its real values and train their ``out_proj`` columns away from zero: only whole zero groups
    are exact."""
    n = kv_heads
    while not _splits_heads(n * groups, n, tp_size):
        n += 1
    return n


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
    FFN width ``dims.tp_size`` does not split get zero heads and neurons
    (``pad_for_tensor_parallel``). ``gathers_batch``: the group's ranks read different
    micro-batches (a frozen teacher split apart from its student): the model keeps its whole head
    too (``TensorParallelLayout.whole_head``).

    A collective over the world when the model trains and some block has fewer key/value heads
    than ranks (it creates the groups of ranks that hold the same key/value head).
    """
    if dims.tp_size == 1:
        return
    from deepspeed.module_inject.layers import set_autotp_mode

    if not pad:
        check_shardable(
            model.config, dims.tp_size, role, TEACHER_TP_SIZE_KEY if gathers_batch else TP_SIZE_KEY
        )
    frozen = not any(p.requires_grad for p in model.parameters())
    if gathers_batch and not frozen:
        raise ValueError(f"gathers_batch is for a frozen model; the {role} trains")
    set_autotp_mode(training=True)  # all-reduces with autograd (the frozen teacher is harmless)
    vocab = model.config.vocab_size
    # The whole, unpadded head, taken before its rows are split.
    whole_head = model.lm_head_weight.detach()[:vocab].clone() if gathers_batch else None
    modules: dict[str, ShardedWeight] = {}
    replica_groups: dict[int, dist.ProcessGroup] = {}  # copies per key/value head -> this rank's
    for i, block in enumerate(model.blocks):
        kept = _sections(block)
        if pad:
            _pad_block(block, dims.tp_size)
        block.attn.dropout_rng = ShardedDropoutRNG(dims.tp_rank)
        for name, sharded in _shard_block(block, dims, kept, replica_groups, frozen).items():
            modules[f"blocks.{i}.{name}"] = sharded
    modules.update(_shard_vocabulary(model, dims))
    # Rows past the tokenizer's ids (``GPT.vocab_in_use``) count as padding too.
    tokens = model.vocab_in_use or vocab
    shard = VocabShard(group=dims.tp_group, start=model.wte.vocab_start_index, vocab_size=tokens)
    model.tensor_parallel = TensorParallelLayout(
        dims.tp_group, dims.tp_rank, dims.tp_size, shard, modules, whole_head
    )
    model.requires_grad_(not frozen)


def _shard_block(
    block: nn.Module,
    dims: ParallelDims,
    kept: dict[str, tuple[int, ...]],
    replica_groups: dict[int, dist.ProcessGroup],
    frozen: bool,
) -> dict[str, ShardedWeight]:
    """Replace ``block``'s projections by their tensor-parallel layers; each one's record by its
    name in the block. ``kept``: the real sections (before padding) of each."""
    from ted_scale.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

    held, attn = _sections(block), block.attn
    modules = {}
    for name, split, linear in _projections(block):
        if split == "qkv":
            layer, replicas = _shard_qkv(attn, held[name], dims)
        else:
            layer_class = RowParallelLinear if split == "row" else ColumnParallelLinear
            layer, replicas = layer_class(linear, dims.tp_group), 1
        parent, attr = _resolve(block, name)
        setattr(parent, attr, layer)
        modules[name] = ShardedWeight(split, held[name], kept[name], replicas)
        if replicas > 1 and not frozen:
            if replicas not in replica_groups:
                replica_groups[replicas] = _kv_replica_group(dims, replicas)
            for p in (layer.kv_weight, layer.kv_bias):
                if p is not None:
                    _sum_gradient_over(p, replica_groups[replicas])
    if attn.q_norm is not None and not frozen:
        for norm in (attn.q_norm, attn.k_norm):
            _sum_gradient_over(norm.weight, dims.tp_group)
    return modules


def _shard_qkv(
    attn: CausalSelfAttention, sections: tuple[int, ...], dims: ParallelDims
) -> tuple[nn.Module, int]:
    """``attn.qkv_proj`` (rows [q; k; v], widths ``sections``) as its tensor-parallel layer, and
    the ranks holding each key/value head (``kv_split``)."""
    from ted_scale.parallel.tp_layers import ColumnParallelLinear

    replicas = kv_split(sections[1] // attn.head_dim, dims.tp_size)[1]
    if replicas > 1:
        return _kv_replicated_qkv(attn, sections, dims, replicas), replicas
    _reorder_rows(attn.qkv_proj, _rank_major_order(sections, dims.tp_size))
    layer = ColumnParallelLinear(attn.qkv_proj, dims.tp_group)
    layer.groups = len(sections)
    return layer, 1


def _kv_replicated_qkv(
    attn: CausalSelfAttention, sections: tuple[int, ...], dims: ParallelDims, replicas: int
) -> nn.Module:
    """``attn.qkv_proj`` (rows [q; k; v], widths ``sections``) as a ``KVReplicatedLinear``: the
    query rows split, and a copy of the key/value head rank r's query heads use, r // replicas
    (query head j uses key/value head j // kv_groups, and rank r holds a contiguous run of them).
    """
    from deepspeed.module_inject.layers import DS_TENSOR_MODEL_PARALLEL

    from ted_scale.parallel.tp_layers import KVReplicatedLinear

    qkv, head_dim = attn.qkv_proj, attn.head_dim
    q_rows, kv_rows, _ = sections
    k_row = q_rows + dims.tp_rank // replicas * head_dim

    def kv_copy(t: Tensor | None) -> Tensor | None:
        """The head's k rows, then its v rows, of ``t`` (weight or bias)."""
        if t is None:
            return None
        t = t.detach()
        return torch.cat([t.narrow(0, k_row, head_dim), t.narrow(0, k_row + kv_rows, head_dim)])

    kv_weight, kv_bias = kv_copy(qkv.weight), kv_copy(qkv.bias)
    qkv.weight = nn.Parameter(qkv.weight.detach()[:q_rows])
    if qkv.bias is not None:
        qkv.bias = nn.Parameter(qkv.bias.detach()[:q_rows])
    layer = KVReplicatedLinear(qkv, kv_weight, kv_bias, dims.tp_group)
    # DeepSpeed's gradient-norm clipping counts a parameter flagged tensor-model-parallel on every
    # rank of the group and any other on its rank 0 alone: flagged on the first rank holding each
    # key/value head (rank 0 among them), each head's gradient counts once.
    for p in (layer.kv_weight, layer.kv_bias):
        if p is not None:
            setattr(p, DS_TENSOR_MODEL_PARALLEL, dims.tp_rank % replicas == 0)
    # This rank's query heads share its one key/value head.
    attn.kv_groups = q_rows // head_dim // dims.tp_size
    return layer


def _kv_replica_group(dims: ParallelDims, replicas: int) -> dist.ProcessGroup:
    """The ranks of this rank's tensor-parallel group that hold the same key/value heads:
    ``replicas`` consecutive ones. ``new_group`` is a collective of the world: every rank creates
    every such group, of every tensor-parallel group, in the same order."""
    mine = None
    for tp_ranks in dims.mesh.mesh.view(-1, dims.tp_size).tolist():
        for first in range(0, dims.tp_size, replicas):
            members = tp_ranks[first : first + replicas]
            group = dist.new_group(members)
            if dims.rank in members:
                mine = group
    return mine


def _sum_gradient_over(param: nn.Parameter, group: dist.ProcessGroup) -> None:
    """Sum ``param``'s gradient over ``group`` as autograd computes it, before it accumulates into
    ``.grad`` (so DeepSpeed's reductions and clipping see the sum): for a weight every rank of
    ``group`` holds alike but uses on its own heads only (Megatron sums such gradients after the
    backward, in ``finalize_model_grads``)."""
    param.register_hook(functools.partial(_all_reduced, group=group))


def _all_reduced(grad: Tensor, *, group: dist.ProcessGroup) -> Tensor:
    total = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=group)
    return total


def _shard_vocabulary(model: GPT, dims: ParallelDims) -> dict[str, ShardedWeight]:
    """Split the token embedding and an untied LM head by vocabulary rows, padded to
    ``padded_vocab_size``; their records by name."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding, VocabParallelLinear

    vocab = model.config.vocab_size
    rows, group = padded_vocab_size(vocab, dims.tp_size), dims.tp_group
    sharded = ShardedWeight("vocab", (rows,), (vocab,))
    # Built around the padded rows: no random initialisation, so the RNG stream (and what is
    # initialised after this, e.g. LWD's projections) is the same at every tensor-parallel size.
    padded = nn.Embedding(rows, model.config.n_embd, _weight=_padded_rows(model.wte.weight, rows))
    model.wte = VocabParallelEmbedding(padded, group)
    if model.unembed is None:
        return {"wte": sharded}
    model.unembed.weight = nn.Parameter(_padded_rows(model.unembed.weight, rows))
    model.unembed = VocabParallelLinear(model.unembed, group)
    return {"wte": sharded, "unembed": sharded}


def _padded_rows(weight: Tensor, rows: int) -> Tensor:
    """``weight`` [V, d] with zero rows appended up to ``rows``."""
    padded = weight.new_zeros(rows, weight.shape[1])
    padded[: weight.shape[0]] = weight.detach()
    return padded


def _projections(block: nn.Module) -> Iterator[tuple[str, Split, nn.Module]]:
    """Each split projection of ``block`` (GPT-2's have no ``gate_proj``): name, split, module."""
    for name, split in _LAYOUTS.items():
        parent, attr = _resolve(block, name)
        if (linear := getattr(parent, attr)) is not None:
            yield name, split, linear


def _qkv_sections(attn: CausalSelfAttention) -> tuple[int, int, int]:
    """The rows of q, k and v in a whole block's ``qkv_proj``."""
    heads = attn.query_heads(attn.qkv_proj.out_features)
    kv = heads // attn.kv_groups * attn.head_dim
    return heads * attn.head_dim, kv, kv


def _sections(block: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each projection's width along its split in a whole block, by section (``ShardedWeight``)."""
    return {
        name: _qkv_sections(block.attn)
        if split == "qkv"
        else (linear.weight.shape[split_dim(split)],)
        for name, split, linear in _projections(block)
    }


def qkv_rows_per_rank(attn: CausalSelfAttention, tp_size: int) -> int:
    """Rows of a whole (possibly padded) block's ``qkv_proj`` each of ``tp_size`` ranks holds: its
    query heads' and its key/value heads' (or its copy of one)."""
    q, kv, _ = _qkv_sections(attn)
    local_kv = kv_split(kv // attn.head_dim, tp_size)[0]
    return q // tp_size + 2 * local_kv * attn.head_dim


def pad_for_tensor_parallel(model: GPT, tp: int) -> None:
    """Give every block zero heads and FFN neurons, after the real ones, up to widths ``tp`` ranks
    can split (in place; meta-device models too): ``padded_kv_heads`` key/value heads, each with
    its query heads, and ``padded_width`` neurons.

    A zero head has zero q, k and v (it attends uniformly to zero values) and zero ``out_proj``
    columns; a zero neuron's activation is gelu(0) = 0, or silu(0) x 0 = 0 (SwiGLU), and its
    ``down_proj`` column is zero. Their outputs and every gradient reaching them are exactly zero,
    so they stay zero under the optimizer and the padded model computes and trains exactly as the
    original.
    """
    for block in model.blocks:
        _pad_block(block, tp)


@torch.no_grad()
def _pad_block(block: nn.Module, tp: int) -> None:
    """``pad_for_tensor_parallel`` of one block."""
    attn = block.attn
    kv_heads = padded_kv_heads(_qkv_sections(attn)[1] // attn.head_dim, attn.kv_groups, tp)
    kv = kv_heads * attn.head_dim
    q = kv * attn.kv_groups
    inner = (padded_width(block.mlp.up_proj.out_features, tp),)
    widths = {
        "attn.qkv_proj": (q, kv, kv),
        "attn.out_proj": (q,),
        "mlp.gate_proj": inner,
        "mlp.up_proj": inner,
        "mlp.down_proj": inner,
    }
    sections = _sections(block)
    for name, split, linear in _projections(block):
        dim = split_dim(split)
        trainable = linear.weight.requires_grad
        weight = _zero_extend(linear.weight, dim, sections[name], widths[name])
        linear.weight = nn.Parameter(weight, requires_grad=trainable)
        if dim == 0 and linear.bias is not None:
            bias = _zero_extend(linear.bias, 0, sections[name], widths[name])
            linear.bias = nn.Parameter(bias, requires_grad=trainable)
        linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]


def _zero_extend(t: Tensor, dim: int, sections: Sequence[int], widths: Sequence[int]) -> Tensor:
    """``t`` with each of its sections along ``dim`` (``sections`` wide) extended by zeros to
    ``widths``."""
    parts = []
    for part, width in zip(t.split(list(sections), dim), widths, strict=True):
        zeros = list(part.shape)
        zeros[dim] = width - part.shape[dim]
        parts += [part, part.new_zeros(zeros)]
    return torch.cat(parts, dim)


def _crop(t: Tensor, dim: int, sections: Sequence[int], widths: Sequence[int]) -> Tensor:
    """``_zero_extend`` undone: the first ``widths`` of each of ``t``'s sections along ``dim``."""
    parts = t.split(list(sections), dim)
    return torch.cat([p.narrow(dim, 0, w) for p, w in zip(parts, widths, strict=True)], dim)


def _resolve(block: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, attr = dotted.rpartition(".")
    return block.get_submodule(parent), attr


def _rank_major_order(sections: Sequence[int], tp: int) -> Tensor:
    """Row order taking sections [q; k; v] (``sections`` rows each) to rank-major
    [q_0; k_0; v_0; q_1; ...], where part r holds the r-th of ``tp`` equal slices of each."""
    slices = [
        rows.view(tp, len(rows) // tp) for rows in torch.arange(sum(sections)).split(sections)
    ]
    return torch.cat(slices, dim=1).flatten()


@torch.no_grad()
def _reorder_rows(linear: nn.Linear, order: Tensor) -> None:
    order = order.to(linear.weight.device)
    linear.weight.copy_(linear.weight[order])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[order])


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
        if owner not in split:
            state[name] = tensor
        elif not kind.startswith("kv_"):  # a key/value copy joins its weight or bias
            state[name] = _unshard(*split[owner], module.get_submodule(owner), kind)
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
    sharded: ShardedWeight, layout: TensorParallelLayout, layer: nn.Module, kind: str
) -> Tensor:
    """The whole ``kind`` ("weight" or "bias") tensor of the split module ``layer`` from the
    group's shards, without the padded rows or columns."""
    shard = getattr(layer, kind)
    if sharded.split == "row" and kind != "weight":
        return shard  # the bias is replicated
    dim = split_dim(sharded.split)
    full = _gather(shard, dim, layout.group)
    if sharded.split == "qkv":
        full = _qkv_rows(full, sharded, layout, getattr(layer, f"kv_{kind}", None))
    return _crop(full, dim, sharded.held, sharded.kept)


def _qkv_rows(
    gathered: Tensor, sharded: ShardedWeight, layout: TensorParallelLayout, kv_copy: Tensor | None
) -> Tensor:
    """[q; k; v] rows (padding included) of ``qkv_proj`` from its gathered shards and, where each
    rank holds a key/value head's copy, from those copies (``kv_copy``: this rank's)."""
    if sharded.kv_replicas == 1:
        return gathered[torch.argsort(_rank_major_order(sharded.held, layout.size))]
    # [tp, 2, head_dim, ...]: rank r's copy of its k rows and v rows; the first of each head's.
    copies = _gather(kv_copy, 0, layout.group).unflatten(0, (layout.size, 2, -1))
    heads = copies[:: sharded.kv_replicas]
    return torch.cat([gathered, heads.transpose(0, 1).flatten(0, 2)])
