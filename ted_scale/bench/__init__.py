"""Benchmarks: a training step against a plain `transformers` reference (`throughput`, `suite`,
`reference`), fused against naive losses (`losses`), and data preparation speed (`data_prep`)."""
