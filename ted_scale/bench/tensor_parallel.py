"""The trainer's step at tensor-parallel size N (``launch/bench_throughput.py --tp N``, launched
with N ranks): tokens/s, the share of the step spent in collectives, and each rank's parameter
and optimizer bytes; with ``--teacher-tp N`` also the teacher alone split over the N ranks and the
student data-parallel over them (docs/tensor_parallel.md, "A teacher split apart").

Shared layout, one data-parallel replica: every collective of the step is tensor-parallel
communication (the row-parallel all-reduces, the column-parallel layers' input-gradient
all-reduces, the embedding's all-reduce, the vocabulary-parallel losses' statistics all-gathers
and grad_hidden all-reduce). Teacher apart: the teacher's all-gather of its group's token ids and
its own all-reduces, then the student's gradient average (``grad_sync_ms``). They are timed by
wrapping ``torch.distributed``'s collectives, the device synchronised on both sides, in the timed
steps themselves (and at the end of each piece of the step); on CPU (gloo) the collectives are
blocking anyway."""

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

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
)


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


def measure_tp(
    preset: Preset, spec: Spec, dims: ParallelDims, teacher_dims: ParallelDims | None = None
) -> dict:
    """``spec``'s step laid out over ``dims``: its row, on every rank.

    Without ``teacher_dims``: teacher and student sharded alike over ``dims``'s tensor-parallel
    group, each data-parallel replica with its own micro-batch, the student's gradients averaged
    over them (``--tp N``: one replica; ``--dp N``: unsplit models on N replicas). With them: the
    teacher split over its own group, the student data-parallel over ``dims``. tokens/s counts
    every micro-batch of the step; ``teacher_ms`` is the time the student waits for the teacher
    (on CPU it runs inline).
    """
    apart = teacher_dims is not None
    batches = synthetic_batches(preset, 4, dims.device)
    timer = CommTimer(dims.device)
    with tempfile.TemporaryDirectory() as run_dir:
        step = ProjectStep(
            preset, spec, dims.device, Path(run_dir), dims=dims, teacher_dims=teacher_dims
        )
        feed = step.feed(batches, prefetch=False)
        steps, comm, pieces = [], [], []
        for i in range(preset.warmup + preset.steps):
            timer.seconds = 0.0
            dist.barrier()
            start = time.perf_counter()
            split = {}
            with timer.active():
                for piece in step.step_parts(feed):
                    timer.sync()
                    split[piece] = (time.perf_counter() - start, timer.seconds)
            if i >= preset.warmup:
                steps.append(time.perf_counter() - start)
                comm.append(timer.seconds)
                pieces.append(split)
        params = sum(p.numel() * p.element_size() for p in step.module.parameters())
        trained = sum(
            p.numel() * p.element_size() for p in step.module.parameters() if p.requires_grad
        )
        teacher_bytes = _teacher_bytes(step.tapper.model) if step.tapper is not None else 0
        best = min(range(len(steps)), key=steps.__getitem__)
        ended = pieces[best]
        grad_sync = 0.0
        if "gradients" in ended:  # the all-reduce of the student's gradients
            grad_sync = ended["gradients"][1] - ended["backward"][1]
        layout = f"tp{dims.tp_size}" if dims.dp_size == 1 else f"dp{dims.dp_size}"
        if apart:
            layout = f"teacher-tp{teacher_dims.tp_size}"
        return {
            "name": f"{spec.name}/{layout}",
            "tp": dims.tp_size,
            "teacher_tp": teacher_dims.tp_size if apart else dims.tp_size,
            "tokens_per_s": dims.dp_size * preset.micro_batch * preset.seq_len / steps[best],
            "step_ms": 1000 * steps[best],
            "teacher_ms": 1000 * ended["teacher"][0],
            "comm_ms": 1000 * comm[best],
            "comm_share": comm[best] / steps[best],
            "grad_sync_ms": 1000 * grad_sync,
            "param_bytes_per_rank": params,
            "teacher_param_bytes_per_rank": teacher_bytes,
            "trained_param_bytes_per_rank": trained,
            "optimizer_bytes_per_rank": optimizer_bytes(step.optimizer),
            "flops_per_token_per_rank": step.flops_per_token(preset.seq_len),
            "device": dims.device.type,
            "torch_threads": torch.get_num_threads(),
        }


def _teacher_bytes(teacher: torch.nn.Module) -> int:
    """The frozen teacher's bytes on this rank: its shards, and a teacher split apart's whole
    head beside them."""
    held = [*teacher.parameters()]
    layout = teacher.tensor_parallel
    if layout is not None and layout.whole_head is not None:
        held.append(layout.whole_head)
    return sum(t.numel() * t.element_size() for t in held)


def run_tp_suite(
    preset: Preset, methods: list[str], tp: int, *, teacher_tp: bool = False
) -> list[dict] | None:
    """Every method's fused step at tensor-parallel size ``tp``, on the ranks this process group
    holds (``torchrun --nproc_per_node tp``; plain ``python`` for tp 1). With ``teacher_tp``, each
    method that supports it also with the teacher alone split over the ``tp`` ranks and the
    student data-parallel over them, beside the shared layout. The rows on rank 0, None on the
    others."""
    from ted_scale.distill.methods import get_method
    from ted_scale.parallel import init_parallel, teacher_dims
    from ted_scale.parallel.dims import ParallelLayoutError

    dims = init_parallel(tp)
    if dims.dp_size != 1:
        raise ParallelLayoutError(
            f"--tp {tp} runs one tensor-parallel group: launch it with exactly {tp} ranks "
            f"(torchrun --nproc_per_node {tp}), not {dims.world_size}"
        )
    student_dims = init_parallel(1) if teacher_tp else None
    rows = []
    for method in methods:
        if not get_method(method).tensor_parallel:
            continue
        spec = Spec(method, True, False, "auto")
        rows.append(measure_tp(preset, spec, dims))
        if student_dims is not None and get_method(method).teacher_apart:
            rows.append(measure_tp(preset, spec, student_dims, teacher_dims(student_dims, tp)))
    return rows if dims.is_main else None


def format_tp_table(rows: list[dict]) -> str:
    """A Markdown table of ``run_tp_suite``'s rows."""
    lines = [
        "| configuration | tokens/s | step ms | teacher ms | comm ms | comm share "
        "| of it grad sync ms | student side MiB/rank | teacher MiB/rank | optimizer MiB/rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} "
            f"| {r['teacher_ms']:.1f} | {r['comm_ms']:.1f} | {100 * r['comm_share']:.1f} % "
            f"| {r['grad_sync_ms']:.1f} | {r['param_bytes_per_rank'] / 2**20:.2f} "
            f"| {r['teacher_param_bytes_per_rank'] / 2**20:.2f} "
            f"| {r['optimizer_bytes_per_rank'] / 2**20:.2f} |"
        )
    return "\n".join(lines)
