"""GPU memory per rank of a run at several tensor-parallel sizes, from its config (no GPU needed).

The same as ``python -m ted_scale.cli.estimate_memory``; see ``python launch/estimate_memory.py --help``.
"""

import sys

from ted_scale.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
