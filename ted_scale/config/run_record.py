"""The record of a run's configuration: the original ``config.yaml`` is kept, each later
invocation's resolved configuration is written beside it as ``config.<n>.yaml``, and a resume
whose changed keys the checkpoint cannot honour is refused or warned about, naming the keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ted_scale.config.parse import ConfigError, dump_yaml, to_dict
from ted_scale.config.schema import RunConfig
from ted_scale.io import atomic_write_text

CONFIG_NAME = "config.yaml"

# Keys whose change makes the saved checkpoints, filters or data position describe another run.
REFUSED_ON_RESUME = (
    "seed",
    "method",
    "teacher.",
    "student.",
    "filters.arch",
    "filters.mlp_hidden",
    "data.path",
    "data.train_split",
    "batch.",
    "deepspeed.zero_stage",
)
# Keys a resume cannot honour: the checkpoint restores the optimizer and its schedule.
IGNORED_ON_RESUME = ("optim.", "stage1.lr", "stage2.lr")
# Keys that say how to start, not what the run is.
NOT_COMPARED = ("resume",)


@dataclass
class ConfigRecord:
    path: Path
    """Where this invocation's resolved configuration was written."""
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """key -> (value in the original config.yaml, value now)."""
    warnings: list[str] = field(default_factory=list)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two nested config dicts (sorted). A key that
    ``old`` lacks is unchanged where ``new`` holds its value in ``defaults``: ``old`` was written
    before the key existed, and the default is what that version ran with."""
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    keys = sorted(k for k in a.keys() | b.keys() if not k.startswith(NOT_COMPARED))
    return {
        k: (a.get(k), b.get(k))
        for k in keys
        if a.get(k) != b.get(k) and not (k not in a and k in d and b[k] == d[k])
    }


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def record_invocation(config: RunConfig, run_dir: Path, *, resuming: bool) -> ConfigRecord:
    """Write this invocation's resolved config and compare it with the run's original.

    The first invocation writes ``run_dir/config.yaml``; later ones keep it and write
    ``config.<n>.yaml`` (n = 2, 3, ...). With ``resuming`` (the run has checkpoints or finished
    phases), a changed key in :data:`REFUSED_ON_RESUME` raises :class:`ConfigError` before
    anything is written, and one in :data:`IGNORED_ON_RESUME` gets a warning.
    """
    original = run_dir / CONFIG_NAME
    text = dump_yaml(config)
    if not original.exists():
        atomic_write_text(original, text)
        return ConfigRecord(original)
    try:
        old = yaml.safe_load(original.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{original}: the run's original config is not valid YAML: {e}") from e
    if not isinstance(old, dict):
        raise ConfigError(f"{original}: the run's original config is not a mapping of keys")
    changes = config_changes(old, to_dict(config), to_dict(type(config)()))
    record = ConfigRecord(original, changes)
    if resuming:
        refused = {k: v for k, v in changes.items() if _matches(k, REFUSED_ON_RESUME)}
        if refused:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ConfigError(
                f"{run_dir} was run with other values of keys a resume cannot change ({listed}); "
                f"the original config is {original}: restore those values, or use another "
                "output_dir (or resume=never in an empty one) to start a new run"
            )
        for key, (a, b) in changes.items():
            if _matches(key, IGNORED_ON_RESUME):
                record.warnings.append(
                    f"{key} changed ({a!r} -> {b!r}) but is ignored by this resume: the optimizer "
                    "and its learning-rate schedule come from the checkpoint"
                )
    n = 2
    while (run_dir / f"config.{n}.yaml").exists():
        n += 1
    record.path = run_dir / f"config.{n}.yaml"
    atomic_write_text(record.path, text)
    return record
