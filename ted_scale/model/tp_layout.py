"""The tensor-parallel facts of a sharded model, as one typed record.

``ted_scale.parallel.parallelize_gpt`` fills ``GPT.tensor_parallel`` with a
``TensorParallelLayout``; the losses (the vocabulary shard of the LM head), the methods (CR-ILD's
sum over heads, MiniDisc's whole copy), evaluation and ``gathered_state`` read it from there. An
unsharded model holds None. docs/design.md, "Tensor parallelism", has the layout itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist
from torch import Tensor

from ted_scale.kernels.vocab_parallel import VocabShard

Split = Literal["qkv", "column", "row", "vocab"]
"""How a weight is split over the group: column-parallel by heads, rank-major [q_r; k_r; v_r]
("qkv"); column-parallel ("column"); row-parallel, partial outputs all-reduced ("row"); by
vocabulary rows, padded ("vocab")."""


def split_dim(split: Split) -> int:
    """The weight dimension a split runs along."""
    return int(split == "row")


@dataclass(frozen=True)
class ShardedWeight:
    """One split module. Along its split dimension the whole weight is made of sections, each
    split alike over the ranks: [q; k; v] rows for ``qkv``, one section otherwise.

    held: each section's width in the sharded model, summed over the ranks (zero heads and
        neurons of the padding included; a replicated key/value head counted once).
    kept: each section's width in the real model (the first ``kept`` of each are real).
    kv_replicas: ``qkv`` only: ranks holding a copy of each key/value head. 1: the key/value heads
        are split like the query heads; more: the group outnumbers them, and every rank holds a
        whole copy of the one its query heads use (``KVReplicatedLinear``).
    """

    split: Split
    held: tuple[int, ...]
    kept: tuple[int, ...]
    kv_replicas: int = 1


@dataclass(frozen=True)
class TensorParallelLayout:
    """A model sharded over ``group`` (``size`` ranks, this one ``rank``).

    vocab: the LM head's (and token embedding's) vocabulary rows on this rank.
    modules: the split modules by their names inside the model (``blocks.0.attn.qkv_proj``,
        ``wte``, an untied ``unembed``); every other parameter is replicated.
    whole_head: None when the group's ranks share their micro-batch (teacher and student split
        alike). A teacher split apart from its data-parallel student (its own group, each rank
        with its own micro-batch) runs on the group's gathered batch, and keeps here its whole,
        unpadded LM head [V, d] for the student's losses (V x d more per rank).
    """

    group: dist.ProcessGroup
    rank: int
    size: int
    vocab: VocabShard
    modules: Mapping[str, ShardedWeight]
    whole_head: Tensor | None = None

    @property
    def gathers_batch(self) -> bool:
        """Whether the model runs on the micro-batches of its whole group (see ``whole_head``)."""
        return self.whole_head is not None


class ShardedLinear:
    """Marks a linear layer whose weight is one rank's shard (``ted_scale.parallel.tp_layers``),
    so that FLOP counts find it without knowing DeepSpeed's classes."""

    weight: Tensor

    @property
    def matmul_weights(self) -> tuple[Tensor, ...]:
        """The weights [d_out, d_in] this rank multiplies its input by: its shard."""
        return (self.weight,)
