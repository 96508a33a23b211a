"""The training entry point behind ``launch/pretrain_ted.py``: clean errors, exit codes."""

from __future__ import annotations

import sys

from ted_scale.config import ConfigError, load_run_config
from ted_scale.data import DataError
from ted_scale.distill.filter_io import FilterMismatchError
from ted_scale.io import os_error_message
from ted_scale.model.hf import CheckpointMismatchError, ModelFolderError
from ted_scale.train.models import ModelMismatchError
from ted_scale.train.run_lock import RunLockedError
from ted_scale.train.safe_checkpoint import UnsafeCheckpointError

# Errors whose message tells the user what to fix: printed without a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    FilterMismatchError,
    CheckpointMismatchError,
    ModelFolderError,
    ModelMismatchError,
    RunLockedError,
    UnsafeCheckpointError,
)


def main(config_path: str, overrides: list[str]) -> int:
    from ted_scale.train.trainer import NonFiniteLossError, train

    try:
        config = load_run_config(config_path, overrides)
        train(config)
    except (*USER_ERRORS, NonFiniteLossError) as e:
        print(f"pretrain_ted: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full or read-only disk, a file in the way: path and errno's meaning
        print(f"pretrain_ted: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    return 0
