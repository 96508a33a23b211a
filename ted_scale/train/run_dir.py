"""Claiming a run directory at start-up: refuse a run directory that overlaps the run's inputs or
links out of itself, an in-training evaluation without held-out data, and ``resume=never`` on a
used directory; take the run lock, and record this invocation's configuration beside the original
(see docs/design.md, "Run directory rules")."""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ted_scale.config import ConfigError, RunConfig, record_invocation
from ted_scale.data.manifest import load_manifest
from ted_scale.io import atomic_write_text, links_leaving
from ted_scale.parallel import agreed
from ted_scale.train.run_lock import RunLock

PROGRESS_NAME = "progress.json"


class RunFileError(ValueError):
    """A file of the run directory that cannot be read; the message names it and the way out."""


def claim_run_dir(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunLock:
    """Main rank only. Returns the held lock; raises before writing anything on a refusal."""
    check_run_dir(config, run_dir)
    if config.resume == "never" and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} is not empty and resume=never: choose another output_dir or resume=auto"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    if lock.previous:
        old = lock.previous
        log(
            f"took over the lock left in {lock.path} by pid {old.get('pid', '?')} on host "
            f"{old.get('host', '?')} (started {old.get('started', '?')}): that run is gone"
        )
    resuming = bool(read_progress(run_dir)["done"]) or any(
        (run_dir / "checkpoints").glob("*/complete")
    )
    record = record_invocation(config, run_dir, resuming=resuming)
    for warning in record.warnings:
        log(f"warning: {warning}")
    if record.changes:
        changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in record.changes.items())
        log(f"config changed since {run_dir / 'config.yaml'}: {changed}")
    return lock


def check_shared(run_dir: Path, rank: int, world_size: int) -> None:
    """Every rank must see the run directory that rank 0 writes: one directory, on a filesystem
    every node mounts at the same path (docs/multinode.md). Rank 0 writes a probe under a fresh
    name (no node can have cached its absence), every rank looks for it, all agree, rank 0 removes
    it. Without the check a node that does not see it failed later with a misleading error (no
    filters record at Stage II, checkpoints split between disks)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    shared = [secrets.token_hex(8), socket.gethostname()] if rank == 0 else [None, None]
    dist.broadcast_object_list(shared, src=0)
    token, main_host = shared
    probe = run_dir / f".shared-{token}"
    with agreed():
        if rank == 0:
            atomic_write_text(probe, f"{main_host}\n")
    try:
        with agreed():
            if rank != 0 and not probe.is_file():
                raise RunFileError(
                    f"output_dir {run_dir.resolve()}: rank {rank} on host {socket.gethostname()} "
                    f"does not see what rank 0 on host {main_host} writes there; output_dir must "
                    "be one directory that every node sees at the same path (a shared "
                    "filesystem): rank 0 writes the filters and the checkpoint records, every "
                    "rank reads them (docs/multinode.md)"
                )
    finally:
        if rank == 0:
            probe.unlink(missing_ok=True)


def _inputs(config: RunConfig) -> dict[str, str]:
    """The config's input paths that exist here, by key (a hub name such as ``gpt2`` is none)."""
    keys = {
        "data.path": config.data.path,
        "teacher.pretrained": config.teacher.pretrained,
        "student.pretrained": config.student.pretrained,
        "eval.lambada_path": config.eval.lambada_path,
    }
    return {k: v for k, v in keys.items() if v is not None and os.path.exists(v)}


def check_run_dir(config: RunConfig, run_dir: Path) -> None:
    """Refuse, naming the keys, an ``output_dir`` that is, contains or lies inside an input (its
    checkpoints would land among the shards, a cleanup would delete the data), a run directory
    whose entries are links to folders outside it (writes would go into a user's folder), and
    ``eval.interval`` with an evaluation split that holds no samples."""
    out = run_dir.resolve()
    for key, value in _inputs(config).items():
        path = Path(value).resolve()
        relation = (
            "is"
            if path == out
            else "lies inside"
            if out.is_relative_to(path)
            else "contains"
            if path.is_relative_to(out)
            else None
        )
        if relation:
            raise ConfigError(
                f"output_dir={config.output_dir} {relation} {key}={value}: a run writes its "
                "checkpoints and outputs there; choose an output_dir apart from the run's inputs"
            )
    if links := links_leaving(run_dir):
        listed = ", ".join(f"{p} -> {os.readlink(p)}" for p in links)
        raise ConfigError(
            f"output_dir={config.output_dir} holds symbolic links to folders outside it "
            f"({listed}): a run writes only inside its directory, never through links; remove "
            "them (their targets stay as they are) or choose another output_dir"
        )
    if config.eval.interval:
        split = load_manifest(config.data.path).splits.get(config.data.eval_split)
        if split is None or split.num_samples == 0:
            raise ConfigError(
                f"eval.interval={config.eval.interval} evaluates held-out perplexity on "
                f"data.eval_split={config.data.eval_split!r} of {config.data.path}, which holds "
                "no samples (prepared with --test-fraction 0?): prepare the data with a test "
                "split, or set eval.interval=0"
            )


def read_progress(run_dir: Path) -> dict[str, Any]:
    """The run's ``progress.json`` (the phases finished), ``{"done": []}`` if absent; a damaged
    one is named with the way out: the checkpoints, not this file, are the source of truth."""
    path = run_dir / PROGRESS_NAME
    if not path.exists():
        return {"done": []}
    try:
        progress = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not JSON ({e})"
    else:
        done = progress.get("done") if isinstance(progress, dict) else None
        if isinstance(done, list) and all(isinstance(name, str) for name in done):
            return progress
        problem = 'not a record {"done": [phase, ...]}'
    raise RunFileError(
        f"{path}: damaged, {problem}. It only lists the finished phases: move it aside "
        f"(mv {path} {path}.damaged) and run again with resume=auto, which continues from the "
        f"newest checkpoint in {run_dir / 'checkpoints'} (the phases before it count as finished)"
    )
