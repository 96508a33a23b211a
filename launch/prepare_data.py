"""Tokenise a corpus into packed, sharded token files for training (see ted_scale.data.prepare).

The same as ``python -m ted_scale.cli.prepare_data``; see ``python launch/prepare_data.py --help``.
"""

import sys

from ted_scale.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
