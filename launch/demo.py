"""`make demo`: a one-seed, shorter copy of the method study, evaluated beside its mean ± std.

The same as ``python -m ted_scale.cli.demo``; see ``python launch/demo.py --help``.
"""

import sys

from ted_scale.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
