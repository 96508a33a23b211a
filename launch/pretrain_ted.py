"""Train with TED (or a baseline) from a YAML run configuration.

The same as ``python -m ted_scale.cli.pretrain_ted``; see ``deepspeed launch/pretrain_ted.py --config configs/RUN.yaml``.
"""

import sys

from ted_scale.cli.pretrain_ted import main

if __name__ == "__main__":
    sys.exit(main())
