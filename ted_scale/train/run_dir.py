"""Claiming a run directory at start-up: refuse ``resume=never`` on a used one, take the run lock,
and record this invocation's configuration beside the original (see docs/design.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ted_scale.config import RunConfig, record_invocation
from ted_scale.train.run_lock import RunLock


def claim_run_dir(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> RunLock:
    """Main rank only. Returns the held lock; raises before writing anything on a refusal."""
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
    resuming = (run_dir / "progress.json").exists() or any(
        (run_dir / "checkpoints").glob("*/complete")
    )
    record = record_invocation(config, run_dir, resuming=resuming)
    for warning in record.warnings:
        log(f"warning: {warning}")
    if record.changes:
        changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in record.changes.items())
        log(f"config changed since {run_dir / 'config.yaml'}: {changed}")
    return lock
