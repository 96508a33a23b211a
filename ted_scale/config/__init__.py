"""Typed run configuration: YAML files under ``configs/``, ``a.b=value`` overrides, validation."""

from __future__ import annotations

import os

from ted_scale.config.parse import ConfigError, dump_yaml, load_config, to_dict
from ted_scale.config.run_record import ConfigRecord, record_invocation
from ted_scale.config.schema import RunConfig


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """The run configuration from a YAML file plus ``a.b=value`` overrides, with the sections of
    every registered method (imported here: the registry is where plug-ins announce them)."""
    from ted_scale.distill.methods import run_config_class

    return load_config(run_config_class(), path, list(overrides))


__all__ = [
    "ConfigError",
    "ConfigRecord",
    "RunConfig",
    "dump_yaml",
    "load_run_config",
    "record_invocation",
    "to_dict",
]
