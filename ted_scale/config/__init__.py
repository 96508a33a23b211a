"""Typed run configuration: YAML files under ``configs/``, ``a.b=value`` overrides, validation.

The core keys live here; each method adds its section through the method registry, which also
loads a whole run configuration (``ted_scale.distill.methods.load_run_config``).
"""

from __future__ import annotations

from ted_scale.config.parse import ConfigError, dump_yaml, load_config, to_dict
from ted_scale.config.run_record import ConfigRecord, record_invocation
from ted_scale.config.schema import RunConfig

__all__ = [
    "ConfigError",
    "ConfigRecord",
    "RunConfig",
    "dump_yaml",
    "load_config",
    "record_invocation",
    "to_dict",
]
