"""Benchmarks: the throughput of a training step against a plain `transformers` reference."""
