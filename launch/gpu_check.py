"""Every GPU-only check in one command, into one Markdown report (``make gpu-check``).

The same as ``python -m ted_scale.cli.gpu_check``; see ``python launch/gpu_check.py --help``.
"""

import sys

from ted_scale.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
