"""Table 1 of the paper from evaluate.py results files, as Markdown.

The same as ``python -m ted_scale.cli.report``; see ``python launch/report.py --help``.
"""

import sys

from ted_scale.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
