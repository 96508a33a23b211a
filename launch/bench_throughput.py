"""Throughput of a training step per method against a plain `transformers` TED reference.

The same as ``python -m ted_scale.cli.bench_throughput``; see ``python launch/bench_throughput.py --help``.
"""

import sys

from ted_scale.cli.bench_throughput import main

if __name__ == "__main__":
    sys.exit(main())
