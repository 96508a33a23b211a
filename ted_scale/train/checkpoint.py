"""DeepSpeed checkpoints made crash-safe: a ``complete`` marker per tag and an atomic ``latest``.

Layout of ``run_dir/checkpoints``::

    <phase>-step00000100/   DeepSpeed's files, rng_rank<r>.pt, then `complete` written last
    latest                  the newest complete tag, replaced atomically after `complete`

A save killed half-way leaves a tag without ``complete``; resuming ignores it and falls back to
the newest complete tag, so the previous checkpoint stays loadable. Tags are ordered by the run's
phase plan (which the method decides), then by step.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ted_scale.io import atomic_write_text
from ted_scale.parallel import barrier

_TAG = re.compile(r"^(?P<phase>[a-z0-9_]+)-step(?P<step>\d{8})$")


@dataclass(frozen=True, order=True)
class CheckpointTag:
    """A checkpoint's place in the run: the phase's index in the plan, then the step."""

    phase_index: int
    step: int
    phase: str = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.phase}-step{self.step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """The checkpoints of one run and their cadence: every ``interval`` steps (0: never in the
    middle of a phase) and at each phase's last step. ``phases``: the run's phase names in order."""

    def __init__(
        self, root: Path, phases: Sequence[str], *, rank: int, keep: int, interval: int
    ) -> None:
        self.root = root
        self.phases = list(phases)
        self.rank = rank
        self.keep = keep
        self.interval = interval

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or bool(self.interval and step % self.interval == 0)

    def tag(self, phase: str, step: int) -> CheckpointTag:
        return CheckpointTag(self.phases.index(phase), step, phase)

    def parse(self, name: str) -> CheckpointTag | None:
        """The tag a directory name stands for, or None (not a tag, or a phase not in the plan)."""
        m = _TAG.match(name)
        if not m or m["phase"] not in self.phases:
            return None
        return self.tag(m["phase"], int(m["step"]))

    def complete_tags(self) -> list[CheckpointTag]:
        if not self.root.is_dir():
            return []
        tags = (self.parse(p.name) for p in self.root.iterdir() if (p / "complete").exists())
        return sorted(t for t in tags if t is not None)

    def latest(self) -> CheckpointTag | None:
        """The newest complete checkpoint (``latest`` is a hint; ``complete`` markers decide)."""
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def resolve(self, resume: str) -> CheckpointTag | None:
        """What ``resume`` (``auto``, ``never`` or a tag directory) points at."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        tag = self.parse(path.name)
        if tag is None or not (path / "complete").exists():
            raise FileNotFoundError(
                f"resume={resume!r} is not a complete ted_scale checkpoint directory"
            )
        if path.resolve().parent != self.root.resolve():
            raise ValueError(f"resume={resume!r} must be inside this run's {self.root}")
        return tag

    def save(self, engine, tag: CheckpointTag, client_state: dict[str, Any]) -> Path:
        """Save on every rank; mark complete, point ``latest`` at it and prune, on rank 0."""
        path = self.root / tag.name
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, interrupted save of the same tag
        barrier()
        engine.save_checkpoint(
            str(self.root), tag=tag.name, client_state=client_state, save_latest=False
        )
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            atomic_write_text(path / "complete", tag.name + "\n")
            atomic_write_text(self.root / "latest", tag.name + "\n")
            for old in self.complete_tags()[: -self.keep]:
                shutil.rmtree(self.root / old.name, ignore_errors=True)
        barrier()
        return path

    def load(self, engine, tag: CheckpointTag) -> dict[str, Any]:
        """Restore engine, optimizer, scheduler and this rank's RNG; return the client state."""
        path, client_state = engine.load_checkpoint(
            str(self.root), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {self.root / tag.name}")
        rng_file = self.root / tag.name / f"rng_rank{self.rank}.pt"
        if rng_file.exists():  # absent when resuming with more ranks than were saved
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state
