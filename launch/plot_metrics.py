"""Figure 2 of the paper (training loss, per-layer distillation loss vs step) from run directories.

The same as ``python -m ted_scale.cli.plot_metrics``; see ``python launch/plot_metrics.py --help``.
"""

import sys

from ted_scale.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
