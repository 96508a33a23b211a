"""Run on N CPU ranks (gloo): a function in spawned processes, for tests of collectives, or a
training job under ``torchrun``, killed and resumed.

``run_ranks(fn, world_size, *args)`` calls ``fn(*args)`` in each rank with RANK, WORLD_SIZE,
LOCAL_RANK and the master address set, so ``ted_scale.parallel.init_parallel`` joins the group;
every failing rank's traceback is raised in the caller.

``killed_and_resumed(env, ranks, args, root, checkpoint)`` runs ``launch/pretrain_ted.py`` under
``torchrun`` uninterrupted, and again killed with SIGKILL after a checkpoint and resumed;
``run_losses`` reads what of a run's metrics must come out the same.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from ted_scale.parallel.dims import close_parallel, free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


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


def run_losses(run: Path) -> list[dict]:
    """Every metrics line's losses and evaluation results (what must not depend on the layout,
    nor on a kill and resume)."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    kept = ("stage", "step", "loss", "eval_")
    return [{k: v for k, v in r.items() if k.startswith(kept)} for r in rows]


def killed_and_resumed(
    env: dict[str, str], ranks: int, args: Sequence[str], root: Path, checkpoint: str
) -> tuple[Path, Path, str]:
    """``launch/pretrain_ted.py *args`` on ``ranks`` ranks twice: into ``root/full``
    uninterrupted, and into ``root/killed`` killed with SIGKILL (launcher and ranks: a node lost)
    once its checkpoint ``checkpoint`` (a tag, ``stage2-step00000003``) is complete, then
    resumed with ``resume=auto``. Returns both run directories and the resumed job's output."""
    full, killed = root / "full", root / "killed"
    _finish(_torchrun_job(env, ranks, *args, f"output_dir={full}"))
    job = _torchrun_job(env, ranks, *args, f"output_dir={killed}")
    _kill_job_after(job, killed / "checkpoints" / checkpoint / "complete")
    assert not (killed / "student_hf").exists(), "the kill came after the run's end"
    out = _finish(_torchrun_job(env, ranks, *args, f"output_dir={killed}", "resume=auto"))
    return full, killed, out


def _torchrun_job(env: dict[str, str], ranks: int, *args: str) -> subprocess.Popen:
    cmd = [
        str(TORCHRUN), f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
        str(REPO / "launch" / "pretrain_ted.py"), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # fmt: skip


def _kill_job_after(job: subprocess.Popen, marker: Path, timeout: float = 600) -> None:
    """kill -9 of the launcher and every rank at once as soon as ``marker`` exists (torchrun
    starts its ranks in sessions of their own, so killing its process group would leave them
    running); raise, with the job's output, if it ended first."""
    deadline = time.time() + timeout
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if job.poll() is not None and not marker.exists():  # it ended on its own: say how
        out = job.communicate()[0]
        raise AssertionError(f"exit {job.returncode} before {marker} was written:\n{out[-6000:]}")
    tree = psutil.Process(job.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    job.wait()
    assert marker.exists(), f"no {marker} within {timeout:.0f} s"


def _finish(job: subprocess.Popen) -> str:
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out[-6000:]
    return out
