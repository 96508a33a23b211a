"""DeepSpeed checkpoints made crash-safe: a ``complete`` marker per tag and an atomic ``latest``.

Layout of ``run_dir/checkpoints``::

    <phase>-step00000100/   DeepSpeed's files (one model file per tensor-parallel rank),
                            rng_rank<r>.safetensors, layout.json, then `complete` last
    latest                  the newest complete tag, replaced atomically after `complete`

A save killed half-way leaves a tag without ``complete``; resuming ignores it and falls back to
the newest complete tag, so the previous checkpoint stays loadable. ``complete`` records the
sha256 of every file of the tag; a resume checks them and falls back, saying so, past a
corrupted or truncated checkpoint. Nothing a resume reads can run code (safe_checkpoint.py).
Tags are ordered by the run's phase plan (which the method decides), then by step. A checkpoint
resumes only at the tensor-parallel size and ZeRO stage it was saved with (``layout.json``) and,
when ZeRO partitions the optimizer states, at its data-parallel size (one optimizer file per rank).
Everything a rank reads before DeepSpeed's collectives is checked under ``agreed()``, so a
refusal found by one rank stops every rank with its message.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ted_scale.config import ConfigError
from ted_scale.io import atomic_write_json, atomic_write_text, os_error_message
from ted_scale.parallel import agreed, barrier
from ted_scale.train.safe_checkpoint import (
    UnsafeCheckpointError,
    check_loadable,
    complete_record,
    make_loads_safe,
    read_rng_state,
    rng_file,
    save_rng_state,
    verify_checkpoint,
)

LAYOUT_FILE = "layout.json"
_TAG = re.compile(r"^(?P<phase>[a-z0-9_]+)-step(?P<step>\d{8})$")
# One file per data-parallel rank when ZeRO partitions the optimizer states (stages 1-3).
_OPTIM_FILE = re.compile(r"^zero_pp_rank_(?P<dp>\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True, order=True)
class CheckpointTag:
    """A checkpoint's place in the run: the phase's index in the plan, then the step."""

    phase_index: int
    step: int
    phase: str = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.phase}-step{self.step:08d}"


class CheckpointManager:
    """The checkpoints of one run and their cadence: every ``interval`` steps (0: never in the
    middle of a phase) and at each phase's last step. ``phases``: the run's phase names in order;
    ``tensor_parallel_size`` and ``zero_stage``: the run's, recorded in each checkpoint and
    checked on resume, as is ``data_parallel_size`` when the optimizer states are partitioned."""

    def __init__(
        self,
        root: Path,
        phases: Sequence[str],
        *,
        rank: int,
        keep: int,
        interval: int,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        zero_stage: int = 1,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = root
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.zero_stage = zero_stage
        self.phases = list(phases)
        self.rank = rank
        self.keep = keep
        self.interval = interval
        self.log = log

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
        """What ``resume`` (``auto``, ``never`` or a tag directory) points at, checksums checked.

        ``auto`` takes the newest intact checkpoint, naming each damaged one it passes over; an
        explicit tag directory must be intact. Every rank resolves; they agree on the outcome.
        """
        with agreed():
            return self._resolve(resume)

    def _resolve(self, resume: str) -> CheckpointTag | None:
        if resume == "never":
            return None
        if resume == "auto":
            tags = self.complete_tags()
            for newer, tag in enumerate(reversed(tags)):
                problem = verify_checkpoint(self.root / tag.name)
                if problem is None:
                    if newer:
                        self.log(f"resuming from {self.root / tag.name}, the newest intact one")
                    return tag
                self.log(f"checkpoint {self.root / tag.name} is damaged, skipped: {problem}")
            if tags:
                raise FileNotFoundError(
                    f"{self.root}: no intact checkpoint to resume from (see above); "
                    "use resume=never in a new output_dir to start afresh"
                )
            return None
        path = Path(resume)
        if path.resolve().parent != self.root.resolve():
            raise ConfigError(
                f"resume={resume!r} is not a checkpoint of this run ({self.root}): to continue "
                f"the run in {path.resolve().parent.parent}, set output_dir to it"
            )
        tag = self.parse(path.name)
        if tag is None or not (path / "complete").exists():
            raise FileNotFoundError(
                f"resume={resume!r} is not a complete ted_scale checkpoint directory"
            )
        problem = verify_checkpoint(path)
        if problem is not None:
            raise FileNotFoundError(f"resume={resume!r} is damaged: {problem}")
        return tag

    def save(self, engine, tag: CheckpointTag, client_state: dict[str, Any]) -> Path:
        """Save on every rank; mark complete, point ``latest`` at it and prune, on rank 0."""
        path = self.root / tag.name
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, interrupted save of the same tag
        barrier()
        try:
            engine.save_checkpoint(
                str(self.root), tag=tag.name, client_state=client_state, save_latest=False
            )
            save_rng_state(rng_file(path, self.rank))
        except (OSError, RuntimeError) as e:  # torch.save tells a full disk without errno or path
            raise OSError(self._save_failure(path, e)) from e
        barrier()
        if self.rank == 0:
            layout = {
                "tensor_parallel_size": self.tensor_parallel_size,
                "zero_stage": self.zero_stage,
            }
            atomic_write_json(path / LAYOUT_FILE, layout)
            atomic_write_text(path / "complete", complete_record(tag.name, path))
            atomic_write_text(self.root / "latest", tag.name + "\n")
            for old in self.complete_tags()[: -self.keep]:
                shutil.rmtree(self.root / old.name, ignore_errors=True)
        barrier()
        return path

    def _save_failure(self, path: Path, error: Exception) -> str:
        """One line for a save that failed: the tag, the reason, the space left, what survives."""
        reason = os_error_message(error) if isinstance(error, OSError) else str(error).strip()
        free = shutil.disk_usage(self.root).free
        previous = self.latest()
        kept = (
            f"the previous checkpoint {self.root / previous.name} is intact and resume=auto "
            "continues from it"
            if previous
            else "there is no earlier checkpoint; resume=auto restarts the phase"
        )
        return (
            f"{path}: saving the checkpoint failed ({reason.splitlines()[-1] if reason else '?'}); "
            f"{free / 2**30:.2f} GiB free on its filesystem (a full disk?). The partial {path} "
            f"can be deleted; {kept} once there is room"
        )

    def load(self, engine, tag: CheckpointTag) -> dict[str, Any]:
        """Restore engine, optimizer, scheduler and this rank's RNG; return the client state.

        What each rank reads (the layout, every DeepSpeed file's pickled structure, its RNG file)
        is checked, and agreed on, before ``load_checkpoint``, whose collectives a refusing rank
        would leave the others waiting in."""
        path = self.root / tag.name
        restore_rng = None
        with agreed():
            self._check_layout(path)
            check_loadable(path)
            rng = rng_file(path, self.rank)
            if rng.exists():  # absent when resuming with more ranks than were saved
                restore_rng = read_rng_state(rng)
        make_loads_safe(engine)
        loaded, client_state = engine.load_checkpoint(
            str(self.root), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {path}")
        if restore_rng is not None:
            restore_rng()
        return client_state

    def _check_layout(self, path: Path) -> None:
        """Refuse a checkpoint saved at another tensor-parallel size (its model files hold other
        shards; checkpoints from before tensor parallelism have no layout file: tp 1) or another
        ZeRO stage (the optimizer states are laid out per stage; older layout files do not say),
        or, when ZeRO partitioned its optimizer states, at another data-parallel size: DeepSpeed
        cannot repartition them (its universal checkpoints need an offline conversion)."""
        record = path / LAYOUT_FILE
        saved, saved_stage = _read_layout(record) if record.exists() else (1, None)
        if saved != self.tensor_parallel_size:
            raise ConfigError(
                f"{path} was saved at parallel.tensor_parallel_size={saved} and this run has "
                f"{self.tensor_parallel_size}: its weights and optimizer states are sharded for "
                f"{saved} ranks. Resume with parallel.tensor_parallel_size={saved}, or start a new output_dir from the exported model "
                "(student.init: pretrained, student.pretrained: <run>/student_hf)"
            )
        if saved_stage is not None and saved_stage != self.zero_stage:
            raise ConfigError(
                f"{path} was saved at ZeRO stage {saved_stage} and this run uses stage "
                f"{self.zero_stage} (deepspeed.zero_stage: null picks 0 on one data-parallel rank "
                f"and 1 on more): its optimizer states are laid out for stage {saved_stage}. "
                f"Resume with deepspeed.zero_stage={saved_stage}"
            )
        partitions = {int(m["dp"]) for p in path.iterdir() if (m := _OPTIM_FILE.match(p.name))}
        if partitions and len(partitions) != self.data_parallel_size:
            saved_dp, tp = len(partitions), self.tensor_parallel_size
            raise ConfigError(
                f"{path} was saved by {saved_dp} data-parallel ranks and this run has "
                f"{self.data_parallel_size}: ZeRO partitioned its optimizer states over "
                f"{saved_dp} ranks and DeepSpeed cannot repartition them. Resume on a world of "
                f"{saved_dp * tp} ranks ({saved_dp} data-parallel x {tp} tensor-parallel), or "
                "start a new output_dir from the exported model (student.init: pretrained, "
                "student.pretrained: <run>/student_hf)"
            )


def _read_layout(record: Path) -> tuple[int, int | None]:
    """(tensor-parallel size, ZeRO stage or None where not recorded) of a checkpoint's
    ``layout.json``; an unreadable one is named."""
    try:
        layout = json.loads(record.read_text())
        size, stage = layout["tensor_parallel_size"], layout.get("zero_stage")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UnsafeCheckpointError(f"{record}: not a readable layout record ({e})") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UnsafeCheckpointError(f"{record}: tensor_parallel_size {size!r} is not a size")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        raise UnsafeCheckpointError(f"{record}: zero_stage {stage!r} is not a ZeRO stage")
    return size, stage
