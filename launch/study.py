"""The method study: a teacher, then students by every method over several seeds, on 2 CPU cores.

The same as ``python -m ted_scale.cli.study``; see ``python launch/study.py --help``.
"""

import sys

from ted_scale.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
