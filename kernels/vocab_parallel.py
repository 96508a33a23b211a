"""Vocabulary-parallel losses (placeholder for the merge: the descriptor only)."""

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    group: dist.ProcessGroup
    start: int
    vocab_size: int
