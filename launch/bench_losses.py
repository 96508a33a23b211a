"""Peak memory and time of the TED losses: fused chunked kernels vs naive full-logits PyTorch.

The same as ``python -m ted_scale.cli.bench_losses``; see ``python launch/bench_losses.py --help``.
"""

import sys

from ted_scale.cli.bench_losses import main

if __name__ == "__main__":
    sys.exit(main())
