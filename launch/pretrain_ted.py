"""Train with TED (or a baseline): ``deepspeed launch/pretrain_ted.py --config configs/RUN.yaml [a.b=value ...]``.

Also runs under ``torchrun`` and plain ``python`` (one process).
"""

from __future__ import annotations

import argparse
import sys

from ted_scale.train.cli import main

if __name__ == "__main__":
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
    args = parser.parse_args()
    sys.exit(main(args.config, args.overrides, args.plugin))
