"""Data pipeline: text -> packed token shards -> memory-mapped distributed loader.

- `sources`: stream documents from HF datasets and local .txt/.jsonl/.parquet files.
- `tokenizer`: load an HF tokenizer or train a byte-level BPE; tokenizer fingerprint.
- `manifest`: the on-disk format (manifest.json) and its validation.
- `prepare`: the preparation tool (parallel tokenising, packing, sharding, resume).
- `loader`: memory-mapped samples and the resumable data-parallel batch loader.
"""


class DataError(Exception):
    """Bad input data or a data directory that does not match what the caller expects.

    Its message is meant for the user as is (the launch scripts print it without a traceback).
    """
