"""The training entry point behind ``launch/pretrain_ted.py``: clean errors, exit codes."""

from __future__ import annotations

import sys

from ted_scale.config import ConfigError, load_run_config
from ted_scale.data import DataError
from ted_scale.distill.filter_io import FilterMismatchError
from ted_scale.model.hf import CheckpointMismatchError
from ted_scale.train.models import ModelMismatchError

# Errors whose message tells the user what to fix: printed without a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    FilterMismatchError,
    CheckpointMismatchError,
    ModelMismatchError,
    FileNotFoundError,
    FileExistsError,
)


def main(config_path: str, overrides: list[str]) -> int:
    from ted_scale.train.trainer import NonFiniteLossError, train

    try:
        config = load_run_config(config_path, overrides)
        train(config)
    except (*USER_ERRORS, NonFiniteLossError) as e:
        print(f"pretrain_ted: error: {e}", file=sys.stderr)
        return 2
    return 0
