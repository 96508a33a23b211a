"""Structured pruning of attention units and FFN neurons, as MiniDisc builds its teacher-assistant
candidates (docs/design.md "Pruning").

An attention unit is one key/value head with the query heads of its group (``kv_groups`` of
them): grouped-query attention is pruned by whole groups, so a pruned block is again one of its
family with the same group size; without grouping (GPT-2) a unit is one head. An FFN neuron is
one SwiGLU neuron across gate, up and down projections (one GELU neuron across up and down).

1. ``mask_importance``: the importance of a unit or neuron is |dL/dm| for a mask m = 1 on its
   output (a unit's query heads share one mask), L the next-token cross-entropy, summed over
   calibration batches.
2. ``reorder``: units and neurons are permuted within each block, most important first; the
   model computes the same function, and every candidate is now a prefix of it.
3. ``subnet_at``: at sparsity s, the fraction s of all units and the fraction s of all neurons
   with the lowest per-block L2-normalised importance are removed (a global ranking), which
   removes the fraction s of the prunable attention and FFN weights.
4. ``extract`` copies a prefix sub-network out as a dense GPT; ``prune`` does 2-4 on a copy.
   ``GPT.forward(subnet=...)`` runs a candidate on the shared weights without copying.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ted_scale.data.loader import IGNORE_INDEX
from ted_scale.kernels import fused_linear_cross_entropy
from ted_scale.model.gpt import GPT, SHAPED_TENSORS, GPTConfig, Subnet, join_units, split_units


@dataclass
class Importance:
    """Per block, one score per attention unit ([heads of the block / group_size]) and per FFN
    neuron ([FFN width of the block]).

    group_size: query heads per unit (``GPTConfig.kv_groups``: a key/value head and its group;
        1, one head, without grouped-query attention).
    """

    heads: list[Tensor]
    neurons: list[Tensor]
    group_size: int = 1

    def normalized(self) -> Importance:
        """Each block's unit scores and neuron scores divided by their L2 norm."""

        def unit(v: Tensor) -> Tensor:
            return v / (v.norm() + 1e-17)  # an all-zero block stays zero

        return replace(
            self, heads=[unit(v) for v in self.heads], neurons=[unit(v) for v in self.neurons]
        )


def mask_importance(
    model: GPT, batches: Iterable[tuple[Tensor, Tensor]], *, fused: bool = True
) -> Importance:
    """Sum over ``batches`` of |dL/dm| for a mask m = 1 on each attention unit's output (its
    query heads') and each neuron's activation, L the mean next-token cross-entropy of the batch
    over the tokenizer's ids (``GPT.loss_head``; dropout off).

    batches: (input_ids [B, T], labels [B, T]) pairs, labels already shifted, -100 ignored.
    fused: the chunked LM-head loss (no [B, T, V] logits); False computes full logits.
    Gradients reach only the masks; the model's parameters and their ``.grad`` are untouched.
    """
    param = next(model.parameters())
    config = model.config
    dtype = torch.promote_types(param.dtype, torch.float32)  # bf16 models still sum in fp32

    def ones(n: int) -> Tensor:
        return torch.ones(n, dtype=dtype, device=param.device, requires_grad=True)

    g = config.kv_groups
    unit_mask = [ones(h // g) for h in config.layer_heads]
    head_mask = [m.repeat_interleave(g) for m in unit_mask]  # a unit's query heads share it
    neuron_mask = [ones(n) for n in config.layer_inner]
    masks = unit_mask + neuron_mask
    head = model.loss_head()[0]
    totals = [torch.zeros_like(m, requires_grad=False) for m in masks]
    was_training = model.training
    model.eval()
    try:
        for input_ids, labels in batches:
            input_ids, labels = input_ids.to(param.device), labels.to(param.device)
            hidden = model(
                input_ids, head_mask=head_mask, neuron_mask=neuron_mask, return_logits=False
            ).last_hidden
            if fused:
                loss = fused_linear_cross_entropy(hidden, head, labels, ignore_index=IGNORE_INDEX)
            else:
                logits = F.linear(hidden, head)
                loss = F.cross_entropy(
                    logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX
                )
            # A block without heads or neurons never uses its (empty) mask.
            grads = torch.autograd.grad(loss, masks, allow_unused=True)
            for total, grad in zip(totals, grads, strict=True):
                if grad is not None:
                    total += grad.detach().abs()
    finally:
        model.train(was_training)
    n = len(unit_mask)
    return Importance(totals[:n], totals[n:], group_size=g)


def _select_blocks(
    model: GPT, unit_index: list[Tensor], neuron_index: list[Tensor]
) -> dict[str, Tensor]:
    """The model's state with block l keeping attention units ``unit_index[l]`` and neurons
    ``neuron_index[l]``, in that order (each unit's query heads, key and value head and output
    columns together; each neuron's gate and up rows and down column together)."""
    state = {}
    for name, t in model.state_dict().items():
        parts = name.split(".", 2)
        shaped = SHAPED_TENSORS.get(parts[2]) if parts[0] == "blocks" else None
        if shaped is not None:
            layer = int(parts[1])
            index = unit_index[layer] if shaped.kind == "groups" else neuron_index[layer]
            pieces = split_units(t, shaped, model.config)
            t = join_units(
                [p.index_select(shaped.dim, index.to(t.device)) for p in pieces], shaped.dim
            )
        state[name] = t
    return state


def _check_shape(importance: Importance, config: GPTConfig) -> None:
    if importance.group_size != config.kv_groups:
        raise ValueError(
            f"importance scores units of {importance.group_size} query heads, but the model "
            f"groups {config.kv_groups} query heads per key/value head"
        )
    have = ([len(v) for v in importance.heads], [len(v) for v in importance.neurons])
    want = ([h // config.kv_groups for h in config.layer_heads], list(config.layer_inner))
    if have != want:
        raise ValueError(
            f"importance covers heads {have[0]} and neurons {have[1]} per block (a score per "
            f"group of {config.kv_groups} query heads), but the model has {want[0]} and {want[1]}"
        )


def _descending(scores: list[Tensor]) -> list[Tensor]:
    return [torch.sort(v, descending=True, stable=True).indices for v in scores]


def reorder(model: GPT, importance: Importance) -> Importance:
    """Permute every block's attention units and neurons in place, most important first.

    The model computes the same function; returns ``importance`` in the new order (non-increasing
    within each block), so that a prefix of each block keeps its most important units.
    """
    _check_shape(importance, model.config)
    unit_order, neuron_order = _descending(importance.heads), _descending(importance.neurons)
    state = _select_blocks(model, unit_order, neuron_order)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])  # in place: optimizers and engines keep their references
    return replace(
        importance,
        heads=[v[i] for v, i in zip(importance.heads, unit_order, strict=True)],
        neurons=[v[i] for v, i in zip(importance.neurons, neuron_order, strict=True)],
    )


def _kept_per_block(scores: list[Tensor], sparsity: float) -> tuple[int, ...]:
    """How many units each block keeps when the fraction ``sparsity`` (to the nearest unit) of
    lowest scores across all blocks goes; ties go block by block, position by position."""
    sizes = torch.tensor([len(v) for v in scores], dtype=torch.long)
    flat = torch.cat([v.detach().cpu().double() for v in scores])
    block_of = torch.repeat_interleave(torch.arange(len(scores)), sizes)
    lowest = torch.sort(flat, stable=True).indices[: math.floor(sparsity * len(flat) + 0.5)]
    return tuple((sizes - torch.bincount(block_of[lowest], minlength=len(scores))).tolist())


def subnet_at(importance: Importance, sparsity: float) -> Subnet:
    """The candidate at ``sparsity`` in [0, 1]: per block, how many heads and neurons stay.

    The fraction ``sparsity`` (to the nearest unit) of all attention units, and of all neurons,
    with the lowest per-block L2-normalised importance is removed, ranked across blocks. On a
    model reordered by this importance, the kept units of each block are a prefix.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    normed = importance.normalized()
    units = _kept_per_block(normed.heads, sparsity)
    return Subnet(
        tuple(u * importance.group_size for u in units), _kept_per_block(normed.neurons, sparsity)
    )


def extract(model: GPT, subnet: Subnet) -> GPT:
    """A dense GPT holding the prefix sub-network ``subnet`` of ``model`` (its own tensors, on
    the model's device, in its dtype); it computes what ``model(..., subnet=subnet)`` does."""
    subnet.check(model.config)
    unit_index = [torch.arange(h // model.config.kv_groups) for h in subnet.heads]
    neuron_index = [torch.arange(n) for n in subnet.inner]
    return _build(model, subnet, _select_blocks(model, unit_index, neuron_index))


def _build(model: GPT, subnet: Subnet, state: dict[str, Tensor]) -> GPT:
    pruned = GPT(
        subnet.apply_to(model.config), activation_checkpointing=model.activation_checkpointing
    )
    pruned.set_attention(model.blocks[0].attn.implementation if model.blocks else "auto")
    param = next(model.parameters())
    pruned.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        pruned.load_state_dict(state)
    return pruned.train(model.training)


def prune(model: GPT, sparsity: float, importance: Importance) -> GPT:
    """A smaller dense GPT: ``model`` without the fraction ``sparsity`` of its least important
    attention units and neurons (``subnet_at``), each block's kept ones in order of importance.

    ``model`` is left as it is; ``prune(model, 0, importance)`` computes what ``model`` does.
    """
    _check_shape(importance, model.config)
    subnet = subnet_at(importance, sparsity)
    g = importance.group_size
    unit_index = [
        i[: h // g] for i, h in zip(_descending(importance.heads), subnet.heads, strict=True)
    ]
    neuron_index = [
        i[:n] for i, n in zip(_descending(importance.neurons), subnet.inner, strict=True)
    ]
    return _build(model, subnet, _select_blocks(model, unit_index, neuron_index))


def subnet_masks(
    config: GPTConfig, subnet: Subnet, device: torch.device | str | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """0/1 head and neuron masks (``GPT.forward``'s ``head_mask``, ``neuron_mask``) that switch
    off everything outside the prefix ``subnet``: the masked full model computes what the
    sub-network does, at the full model's cost."""
    subnet.check(config)

    def prefix(n: int, keep: int) -> Tensor:
        return (torch.arange(n, device=device) < keep).float()

    heads = [prefix(n, k) for n, k in zip(config.layer_heads, subnet.heads, strict=True)]
    neurons = [prefix(n, k) for n, k in zip(config.layer_inner, subnet.inner, strict=True)]
    return heads, neurons
