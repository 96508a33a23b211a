"""Distillation: what is matched, through what, and with which loss.

- `layer_map`: the paper's map M(k) from student blocks to teacher blocks, or an explicit list.
- `filters`: task-aware filters g^k (linear, mlp, next_block, rest_blocks) as a `FilterBank`.
- `filter_io`: filters on disk, tied to the teacher and map they were trained for.
- `objectives`: CE, KD, MSE distances, fused (chunked LM head) and plain.
- `modules`: the frozen side (`FrozenTapper`) and the trained side (`StudentDistillation`: Stage II
  and plain LM training); Stage I's `FilterTraining` is TED's own (`methods/ted.py`).
- `methods/`: one module per method, the registry, and the interface they implement (`base`).
"""
