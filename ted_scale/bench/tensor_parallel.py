"""The trainer's step at tensor-parallel size N (``launch/bench_throughput.py --tp N``, launched
with N ranks): tokens/s, the share of the step spent in collectives, and each rank's parameter
and optimizer bytes.

One data-parallel replica: every collective of the step is tensor-parallel communication (the
row-parallel all-reduces, the column-parallel layers' input-gradient all-reduces, the embedding's
all-reduce, the vocabulary-parallel losses' statistics all-gathers and grad_hidden all-reduce).
They are timed by wrapping ``torch.distributed``'s collectives, the device synchronised on both
sides, in the timed steps themselves; on CPU (gloo) the collectives are blocking anyway.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ted_scale.bench.presets import Preset, Spec
from ted_scale.bench.throughput import ProjectStep, synthetic_batches
from ted_scale.parallel import ParallelDims

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


class CommTimer:
    """Seconds spent inside ``torch.distributed`` collectives while it is active."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = 0.0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        originals = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in originals.items():
            setattr(dist, name, self._timed(fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            return out

        return timed


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW's m and v, its step counters)."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def measure_tp(preset: Preset, spec: Spec, dims: ParallelDims) -> dict:
    """``spec``'s step sharded over ``dims`` (one data-parallel replica): its row, on every rank."""
    batches = synthetic_batches(preset, 4, dims.device)
    timer = CommTimer(dims.device)
    with tempfile.TemporaryDirectory() as run_dir:
        step = ProjectStep(preset, spec, dims.device, Path(run_dir), dims=dims)
        feed = step.feed(batches, prefetch=False)
        steps, comm = [], []
        for i in range(preset.warmup + preset.steps):
            timer.seconds = 0.0
            dist.barrier(group=dims.tp_group)
            start = time.perf_counter()
            with timer.active():
                for _ in step.step_parts(feed):
                    pass
            timer.sync()
            if i >= preset.warmup:
                steps.append(time.perf_counter() - start)
                comm.append(timer.seconds)
        params = sum(p.numel() * p.element_size() for p in step.module.parameters())
        trained = sum(
            p.numel() * p.element_size() for p in step.module.parameters() if p.requires_grad
        )
        best = min(range(len(steps)), key=steps.__getitem__)
        return {
            "name": f"{spec.name}/tp{dims.tp_size}",
            "tp": dims.tp_size,
            "tokens_per_s": preset.micro_batch * preset.seq_len / steps[best],
            "step_ms": 1000 * steps[best],
            "comm_ms": 1000 * comm[best],
            "comm_share": comm[best] / steps[best],
            "param_bytes_per_rank": params,
            "trained_param_bytes_per_rank": trained,
            "optimizer_bytes_per_rank": optimizer_bytes(step.optimizer),
            "flops_per_token_per_rank": step.flops_per_token(preset.seq_len),
            "device": dims.device.type,
            "torch_threads": torch.get_num_threads(),
        }


def run_tp_suite(preset: Preset, methods: list[str], tp: int) -> list[dict] | None:
    """Every method's fused step at tensor-parallel size ``tp``, on the ranks this process group
    holds (``torchrun --nproc_per_node tp``; plain ``python`` for tp 1). The rows on rank 0, None
    on the others."""
    from ted_scale.distill.methods import get_method
    from ted_scale.parallel import init_parallel
    from ted_scale.parallel.dims import ParallelLayoutError

    dims = init_parallel(tp)
    if dims.dp_size != 1:
        raise ParallelLayoutError(
            f"--tp {tp} runs one tensor-parallel group: launch it with exactly {tp} ranks "
            f"(torchrun --nproc_per_node {tp}), not {dims.world_size}"
        )
    rows = []
    for method in methods:
        if not get_method(method).tensor_parallel:
            continue
        rows.append(measure_tp(preset, Spec(method, True, False, "auto"), dims))
    return rows if dims.is_main else None


def format_tp_table(rows: list[dict]) -> str:
    """A Markdown table of ``run_tp_suite``'s rows."""
    lines = [
        "| configuration | tokens/s | step ms | TP comm ms | TP comm share | params MiB/rank "
        "| optimizer MiB/rank |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['comm_ms']:.1f} "
            f"| {100 * r['comm_share']:.1f} % | {r['param_bytes_per_rank'] / 2**20:.2f} "
            f"| {r['optimizer_bytes_per_rank'] / 2**20:.2f} |"
        )
    return "\n".join(lines)
