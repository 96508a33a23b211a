"""What a re-run study may reuse: a directory (the prepared corpus, the teacher, a student run) whose
fingerprint, recorded beside it as `NAME.fingerprint.json`, equals the one the study computes now.

A fingerprint is a flat {dotted key: value} of everything that decides the directory's content:
the resolved run configuration, the inputs (corpus settings and file identity, the prepared
data's manifest, the teacher's own fingerprint) and the evaluation settings. A directory whose
record differs, or that has none, is removed (the log names the keys that differ) and redone: it
lies inside the study's `output_dir`, which the study owns. The record is written before any
work goes in, so a study killed at any point resumes (`resume: auto`) what it started, and only
that (see docs/design.md, "The method study").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ted_scale.distill.methods import load_run_config
from ted_scale.io import atomic_write_json, file_sha256

Fingerprint = dict[str, Any]


def flatten(value: Any, prefix: str = "") -> Fingerprint:
    """Nested dicts and dataclasses as {"a.b": leaf}, leaves as JSON would give them back."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: Fingerprint = {}
        for key, item in value.items():
            out |= flatten(item, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): json.loads(json.dumps(value))}


def digest(fingerprint: Fingerprint) -> str:
    """One value standing for a whole fingerprint (what a dependent directory records)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def run_fingerprint(config_path: Path, inputs: Fingerprint) -> Fingerprint:
    """A training run's: its configuration as the trainer resolves it (defaults included), and
    the inputs the configuration names only by path."""
    return flatten(load_run_config(config_path), "config.") | flatten(inputs, "inputs.")


def data_digest(data: Path) -> str:
    """The prepared data's identity: its manifest holds every shard's sha256 and the tokenizer's."""
    return file_sha256(data / "manifest.json")


def record_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".fingerprint.json")


def claim(directory: Path, fingerprint: Fingerprint, log: Callable[[str], None]) -> bool:
    """Make `directory` hold the work of `fingerprint`: True when its content (if any) can be
    reused; otherwise it is removed, naming why, and the new record written before any work."""
    path = record_path(directory)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old == fingerprint:
        return True
    if directory.exists():
        if isinstance(old, dict):
            keys = sorted(
                k for k in old.keys() | fingerprint.keys() if old.get(k) != fingerprint.get(k)
            )
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            why = f"changed: {', '.join(keys[:8])}{more}"
        else:
            why = "no fingerprint record: made by an older study or a changed one"
        log(f"{directory}: not reused ({why}); redoing it")
        shutil.rmtree(directory)
    atomic_write_json(path, fingerprint)
    return False
