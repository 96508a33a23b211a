"""Structured pruning of attention heads and FFN neurons, as MiniDisc builds its teacher-assistant
candidates (docs/design.md "Pruning").

1. ``mask_importance``: the importance of a head or neuron is |dL/dm| for a mask m = 1 on its
   output, L the next-token cross-entropy, summed over calibration batches.
2. ``reorder``: heads and neurons are permuted within each block, most important first; the
   model computes the same function, and every candidate is now a prefix of it.
3. ``subnet_at``: at sparsity s, the fraction s of all heads and the fraction s of all neurons
   with the lowest per-block L2-normalised importance are removed (a global ranking), which
   removes the fraction s of the prunable attention and FFN weights.
4. ``extract`` copies a prefix sub-network out as a dense GPT; ``prune`` does 2-4 on a copy.
   ``GPT.forward(subnet=...)`` runs a candidate on the shared weights without copying.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ted_scale.data.loader import IGNORE_INDEX
from ted_scale.kernels import fused_linear_cross_entropy
from ted_scale.model.gpt import GPT, SHAPED_TENSORS, GPTConfig, Subnet


@dataclass
class Importance:
    """Per block, one score per attention head ([heads of the block]) and per FFN neuron
    ([FFN width of the block])."""

    heads: list[Tensor]
    neurons: list[Tensor]

    def normalized(self) -> Importance:
        """Each block's head scores and neuron scores divided by their L2 norm."""

        def unit(v: Tensor) -> Tensor:
            return v / (v.norm() + 1e-17)  # an all-zero block stays zero

        return Importance([unit(v) for v in self.heads], [unit(v) for v in self.neurons])


def mask_importance(
    model: GPT, batches: Iterable[tuple[Tensor, Tensor]], *, fused: bool = True
) -> Importance:
    """Sum over ``batches`` of |dL/dm| for a mask m = 1 on each head's output and each neuron's
    activation, L the mean next-token cross-entropy of the batch (dropout off).

    batches: (input_ids [B, T], labels [B, T]) pairs, labels already shifted, -100 ignored.
    fused: the chunked LM-head loss (no [B, T, V] logits); False computes full logits.
    Gradients reach only the masks; the model's parameters and their ``.grad`` are untouched.
    """
    param = next(model.parameters())
    config = model.config
    dtype = torch.promote_types(param.dtype, torch.float32)  # bf16 models still sum in fp32

    def ones(n: int) -> Tensor:
        return torch.ones(n, dtype=dtype, device=param.device, requires_grad=True)

    head_mask = [ones(h) for h in config.layer_heads]
    neuron_mask = [ones(n) for n in config.layer_inner]
    masks = head_mask + neuron_mask
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
                loss = fused_linear_cross_entropy(
                    hidden, model.lm_head_weight, labels, ignore_index=IGNORE_INDEX
                )
            else:
                logits = model.lm_head(hidden)
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
    n = len(head_mask)
    return Importance(totals[:n], totals[n:])


def _select(t: Tensor, dim: int, groups: int, unit: int, index: Tensor) -> Tensor:
    """The units ``index`` (each ``unit`` features wide) of each of ``groups`` parts of ``t``."""
    parts = t.unflatten(dim, (groups, t.shape[dim] // (groups * unit), unit))
    return parts.index_select(dim + 1, index.to(t.device)).flatten(dim, dim + 2)


def _select_blocks(
    model: GPT, head_index: list[Tensor], neuron_index: list[Tensor]
) -> dict[str, Tensor]:
    """The model's state with block l keeping heads ``head_index[l]`` and neurons
    ``neuron_index[l]``, in that order."""
    units = {"heads": model.config.head_dim, "inner": 1}
    state = {}
    for name, t in model.state_dict().items():
        parts = name.split(".", 2)
        suffix = parts[2] if parts[0] == "blocks" else None
        if suffix in SHAPED_TENSORS:
            layer = int(parts[1])
            dim, groups, kind = SHAPED_TENSORS[suffix]
            index = head_index[layer] if kind == "heads" else neuron_index[layer]
            t = _select(t, dim, groups, units[kind], index)
        state[name] = t
    return state


def _check_shape(importance: Importance, config: GPTConfig) -> None:
    have = ([len(v) for v in importance.heads], [len(v) for v in importance.neurons])
    want = (list(config.layer_heads), list(config.layer_inner))
    if have != want:
        raise ValueError(
            f"importance covers heads {have[0]} and neurons {have[1]} per block, but the model "
            f"has {want[0]} and {want[1]}"
        )


def _descending(scores: list[Tensor]) -> list[Tensor]:
    return [torch.sort(v, descending=True, stable=True).indices for v in scores]


def reorder(model: GPT, importance: Importance) -> Importance:
    """Permute every block's heads and neurons in place, most important first.

    The model computes the same function; returns ``importance`` in the new order (non-increasing
    within each block), so that a prefix of each block keeps its most important units.
    """
    _check_shape(importance, model.config)
    head_order, neuron_order = _descending(importance.heads), _descending(importance.neurons)
    state = _select_blocks(model, head_order, neuron_order)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])  # in place: optimizers and engines keep their references
    return Importance(
        [v[i] for v, i in zip(importance.heads, head_order, strict=True)],
        [v[i] for v, i in zip(importance.neurons, neuron_order, strict=True)],
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

    The fraction ``sparsity`` (to the nearest unit) of all heads, and of all neurons, with the
    lowest per-block L2-normalised importance is removed, ranked across blocks. On a model
    reordered by this importance, the kept units of each block are a prefix.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    normed = importance.normalized()
    return Subnet(
        _kept_per_block(normed.heads, sparsity), _kept_per_block(normed.neurons, sparsity)
    )


def extract(model: GPT, subnet: Subnet) -> GPT:
    """A dense GPT holding the prefix sub-network ``subnet`` of ``model`` (its own tensors, on
    the model's device, in its dtype); it computes what ``model(..., subnet=subnet)`` does."""
    subnet.check(model.config)
    head_index = [torch.arange(h) for h in subnet.heads]
    neuron_index = [torch.arange(n) for n in subnet.inner]
    return _build(model, subnet, _select_blocks(model, head_index, neuron_index))


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
    heads and neurons (``subnet_at``), each block's kept units in order of importance.

    ``model`` is left as it is; ``prune(model, 0, importance)`` computes what ``model`` does.
    """
    _check_shape(importance, model.config)
    subnet = subnet_at(importance, sparsity)
    head_index = [i[:h] for i, h in zip(_descending(importance.heads), subnet.heads, strict=True)]
    neuron_index = [
        i[:n] for i, n in zip(_descending(importance.neurons), subnet.inner, strict=True)
    ]
    return _build(model, subnet, _select_blocks(model, head_index, neuron_index))


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
