"""Train with TED (or a baseline) from a YAML run configuration.

    deepspeed --module ted_scale.cli.pretrain_ted --config configs/RUN.yaml [a.b=value ...]
    deepspeed launch/pretrain_ted.py --config configs/RUN.yaml [a.b=value ...]

Also runs under ``torchrun`` (``-m ted_scale.cli.pretrain_ted``) and plain ``python`` (one process).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ted_scale.config import ConfigError
from ted_scale.data import DataError
from ted_scale.distill.filter_io import FilterMismatchError
from ted_scale.distill.methods import load_run_config
from ted_scale.eval import EvalError
from ted_scale.io import DamagedFileError
from ted_scale.model import ModelMismatchError
from ted_scale.model.hf import CheckpointMismatchError, ModelFolderError
from ted_scale.parallel.agree import RankRefusedError, error_message
from ted_scale.parallel.dims import ParallelLayoutError
from ted_scale.parallel.watch import LOST_STATUS, RESUME_HINT, lost_peer_message
from ted_scale.process import tell_launcher
from ted_scale.train.run_dir import RunFileError
from ted_scale.train.run_lock import RunLockedError
from ted_scale.train.safe_checkpoint import UnsafeCheckpointError

# Errors whose message tells the user what to fix: printed without a traceback, on every rank
# (RankRefusedError: one that another rank found, agreed across ranks).
USER_ERRORS = (
    ConfigError,
    DamagedFileError,
    DataError,
    EvalError,
    FilterMismatchError,
    CheckpointMismatchError,
    ModelFolderError,
    ModelMismatchError,
    ParallelLayoutError,
    RankRefusedError,
    RunFileError,
    RunLockedError,
    UnsafeCheckpointError,
)


def load_plugin(name: str) -> None:
    """Import a module that registers methods: a dotted module name or a ``.py`` file path."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--plugin {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--plugin {name}: {e}") from e


def run(config_path: str, overrides: list[str], plugins: list[str] = ()) -> int:
    """Load plug-ins and the config, train; a user error is one line on stderr and exit status 2."""
    from ted_scale.train.nonfinite import NonFiniteLossError
    from ted_scale.train.trainer import train

    try:
        for plugin in plugins:
            load_plugin(plugin)
        config = load_run_config(config_path, overrides)
        train(config)
    except (*USER_ERRORS, NonFiniteLossError, OSError) as e:
        # An OS error (full or read-only disk, a file in the way) with its path and errno's meaning.
        line = f"pretrain_ted: error: {error_message(e)}"
        # One write: every rank prints its line into the same pipe, and print() writes the text
        # and the newline apart, so two ranks' lines could merge.
        sys.stderr.write(line + "\n")
        tell_launcher(line)
        return 2
    except RuntimeError as e:  # a collective whose peer went away: one line, no traceback
        lost = lost_peer_message(e)
        if lost is None:
            raise
        rank = os.environ.get("RANK", "0")
        line = f"pretrain_ted: error: rank {rank} stops: {lost}; {RESUME_HINT}"
        sys.stderr.write(line + "\n")
        tell_launcher(line)
        return LOST_STATUS
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (dotted name or .py file) that registers more methods; repeatable",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("overrides", nargs="*", help="config overrides as key.subkey=value")
    args = parser.parse_args(argv)
    status = run(args.config, args.overrides, args.plugin)
    if status == 0:
        from ted_scale.parallel.dims import close_parallel

        close_parallel()
    return status


if __name__ == "__main__":
    sys.exit(main())
