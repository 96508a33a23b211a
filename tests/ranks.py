"""Run a function on N CPU ranks (gloo) in spawned processes, for tests of collectives.

``run_ranks(fn, world_size, *args)`` calls ``fn(*args)`` in each rank with RANK, WORLD_SIZE,
LOCAL_RANK and the master address set, so ``ted_scale.parallel.init_parallel`` joins the group;
every failing rank's traceback is raised in the caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from typing import Any

from ted_scale.parallel.dims import close_parallel, free_port


def _rank_main(fn: Callable, rank: int, world: int, port: int, errors: Any, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    try:
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    close_parallel()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> None:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; raise with the failing ranks' tracebacks."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, errors, args))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        # A rank that crashed first makes the others fail in a collective: show every rank's.
        raise AssertionError("\n".join(failures))
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise AssertionError(f"ranks exited with {codes}")
