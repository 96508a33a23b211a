"""Benchmark data preparation against the tokenizer's ceiling and the conventional HF route.

The same as ``python -m ted_scale.cli.bench_data``; see ``python launch/bench_data.py --help``.
"""

import sys

from ted_scale.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
