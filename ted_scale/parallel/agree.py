"""Ranks that agree on refusals (docs/design.md, "Reliability").

A user file is read by some ranks only (the run lock by rank 0, ``rng_rank<r>`` by rank r): a
rank that refused one alone would leave the others blocked in the next collective, to end in a
gloo or NCCL traceback. ``agreed()`` wraps such a section, which must hold no collective: at its
end every rank learns whether any rank failed and raises the same message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from ted_scale.io import os_error_message


class RankRefusedError(RuntimeError):
    """Another rank refused an input; the message is that rank's own."""


def error_message(e: BaseException) -> str:
    """An error as its one-line message (an OS error with its path and errno's meaning)."""
    return os_error_message(e) if isinstance(e, OSError) else str(e)


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Run the block on every rank, then share the outcome: if any rank raised, every rank raises
    the lowest failing rank's message (that rank its own exception, the others
    :class:`RankRefusedError`). The block must not enter a collective."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # a bug elsewhere fails the same way: the others must not hang
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else error_message(error))
    failed = next(((rank, m) for rank, m in enumerate(outcomes) if m is not None), None)
    if failed is None:
        return
    rank, message = failed
    if rank == dist.get_rank():
        raise error
    raise RankRefusedError(message) from None
