"""Evaluate a model (HF folder, hub name or run directory) on LAMBADA, WikiText and held-out data.

The same as ``python -m ted_scale.cli.evaluate``; see ``python launch/evaluate.py --help``.
"""

import sys

from ted_scale.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
