"""Task-aware filters g^k: map a tapped residual-stream state H^k to a width-d_t representation.

Architectures: ``linear`` (d_in x d_out), ``mlp`` (Linear-GELU-Linear), ``next_block`` (a copy of
the block after the tapped one) and ``rest_blocks`` (copies of every later block). A block filter
tapped at the last block has no later block to copy and is the identity.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ted_scale.model.gpt import GPT

FilterArch = Literal["linear", "mlp", "next_block", "rest_blocks"]
FilterInit = Literal["random", "identity"]


class LinearFilter(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)


class MLPFilter(nn.Module):
    def __init__(self, d_in: int, d_out: int, d_hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_in, d_hidden)
        self.down_proj = nn.Linear(d_hidden, d_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(h), approximate="tanh"))


class BlockFilter(nn.Module):
    """Copies of transformer blocks run on the tapped state (no blocks: the identity)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return h


class FilterBank(nn.Module):
    """The K filters of one model, one per tapped layer, applied together."""

    def __init__(self, filters: Sequence[nn.Module], layers: Sequence[int]) -> None:
        super().__init__()
        self.filters = nn.ModuleList(filters)
        self.layers = list(layers)

    def forward(self, hidden: Sequence[Tensor]) -> list[Tensor]:
        """K tensors [B, T, d_in] -> K tensors [B, T, d_out]."""
        return [g(h) for g, h in zip(self.filters, hidden, strict=True)]


def init_random_(module: nn.Module, generator: torch.Generator) -> None:
    """GPT-2's initialisation of every linear layer in ``module`` (weights normal with std 0.02,
    biases zero), drawn on ``generator``'s device (a CPU one: the same draw on any device)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=generator, device=generator.device) * 0.02
                )
                if m.bias is not None:
                    m.bias.zero_()


def build_filters(
    arch: FilterArch,
    model: GPT,
    layers: Sequence[int],
    *,
    d_out: int,
    generator: torch.Generator,
    mlp_hidden: int | None = None,
    init: FilterInit = "random",
    reinit_blocks: bool = False,
) -> FilterBank:
    """Filters for ``model`` tapped after each of ``layers`` (0-based blocks).

    ``linear`` and ``mlp`` filters start random (``init_random_`` from ``generator``), or, with
    ``init="identity"``, a square linear filter starts as the identity (its first prediction is the
    model's own intermediate read-out through the head, the "logit lens"). Block filters copy
    ``model``'s later blocks (their width must equal ``d_out``); ``reinit_blocks`` re-draws them too.
    """
    d_in = model.config.n_embd
    if arch in ("next_block", "rest_blocks") and d_in != d_out:
        raise ValueError(f"{arch} filters keep the model width {d_in}, but {d_out} is needed")
    if init == "identity" and (arch != "linear" or d_in != d_out):
        raise ValueError(f"identity init needs square linear filters, not {arch} {d_in} -> {d_out}")
    filters: list[nn.Module] = []
    for layer in layers:
        if arch == "linear":
            filters.append(LinearFilter(d_in, d_out))
        elif arch == "mlp":
            filters.append(MLPFilter(d_in, d_out, mlp_hidden or d_out))
        elif arch == "next_block":
            filters.append(BlockFilter(model.blocks[layer + 1 : layer + 2]))
        elif arch == "rest_blocks":
            filters.append(BlockFilter(model.blocks[layer + 1 :]))
        else:
            raise ValueError(f"unknown filter architecture {arch!r}")
    bank = FilterBank(filters, layers)
    if init == "identity":
        with torch.no_grad():
            for g in bank.filters:
                g.proj.weight.copy_(torch.eye(d_out))
                g.proj.bias.zero_()
    elif reinit_blocks or arch in ("linear", "mlp"):
        init_random_(bank, generator)
    return bank.requires_grad_(True)  # copies of a frozen model's blocks arrive frozen
