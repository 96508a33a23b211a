"""One measured configuration of the throughput benchmark: build the step, time it, count it.

A configuration is a registered method (``lm`` = student alone with CE, ``kd``, ``lwd``, ``ted``,
``ted_kl``, ...) with the loss (fused or full logits), teacher prefetch and attention kernel switched
as in a run config, or the ``reference`` (TED as plain `transformers` code, see ``hf_reference.py``).
This project's step is the trainer's own: ``bench_config`` writes the run configuration, the
method registry builds the phases from it exactly as the trainer does (the phases before the
benchmarked one, ``Method.benchmarked``, are built and finished without training, so it finds
their files: TED's filters, MiniDisc's importance from synthetic batches), and that phase's
trained module, frozen tapper (fed by ``TeacherFeed``) and FLOP count are timed with
``build_optimizer``'s AdamW, in the trainer's precision. The DeepSpeed engine is left out here: on
one rank with ZeRO-0 it adds gradient clipping and bookkeeping only, the same for every method.

Measurement, per configuration:
- ``warmup`` steps, then ``steps`` timed steps, each ended by a device synchronisation; the step
  time is the fastest of them (the least disturbed by other load on a shared machine, as in
  ``ted_scale/bench/losses.py``; all of them are kept in ``step_ms_all``), tokens/s = B*T / that.
- then ``instrumented`` steps with a device synchronisation after each piece: teacher (batch to
  device + frozen teacher + its filters), student forward (the student trunk up to its final
  LayerNorm, timed by a forward hook), losses (everything from the trunk's output to the scalar
  loss: LM head, CE/KD, filters, layer distances; the fused kernels also compute the LM-head
  gradients here, in the forward pass), backward, optimizer (AdamW step + zero_grad). The split is
  each piece's fastest over those steps; it is taken in a separate pass because the synchronisations (and the
  inline teacher) would distort the timed pass, so its sum may differ a little from the step time.
- achieved TFLOP/s from ``ted_scale.flops`` (the counts the trainer reports) and, on a GPU in
  its peak table, MFU.
- peak memory (``PeakMemory``) above the process's state before any model was built, so weights,
  gradients, optimizer state and activations all count. Run in a fresh process per configuration
  (``python -m ted_scale.bench.throughput_suite``) for clean CPU numbers.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ted_scale.bench.hf_reference import ReferenceTED
from ted_scale.bench.peak_memory import PeakMemory
from ted_scale.bench.presets import ALPHA_KD, ALPHA_LAYER, TEMPERATURE, Preset, Spec, bench_config
from ted_scale.config.schema import OptimConfig
from ted_scale.distill.layer_map import paper_layer_map
from ted_scale.distill.methods import (
    MethodContext,
    build_benchmarked,
    get_method,
)
from ted_scale.distill.run_models import build_run_models, build_teacher
from ted_scale.flops import device_peak_tflops
from ted_scale.parallel import ParallelDims
from ted_scale.precision import autocast, compute_dtype
from ted_scale.train.optim import build_optimizer
from ted_scale.train.prefetch import TeacherFeed
from ted_scale.train.trainer import seed_everything

PIECES = ("teacher", "student_forward", "losses", "backward", "optimizer")
OPTIM = OptimConfig()
CPU = torch.device("cpu")


class _SyntheticLoader:
    """Stands in for ``DistributedBatchLoader`` under ``TeacherFeed``: cycles over fixed batches."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}


class ProjectStep:
    """The trainer's step for ``spec``: its method's benchmarked phase (``Method.benchmarked``,
    by default the first distill phase), built through the registry.

    batches: ``MethodContext.batches`` for the phases before it that read data (MiniDisc's
    calibration); default: the preset's synthetic batches.
    dims: a tensor-parallel layout to shard the teacher and the student over, as the trainer does
    (``ted_scale.bench.tensor_parallel``); default: one process. With more than one data-parallel
    rank, each rank steps on its own micro-batch and the student's gradients are averaged over
    them before the optimizer (the ``gradients`` piece).
    teacher_dims: the teacher's own layout, split apart from the student
    (``parallel.teacher_tensor_parallel_size``); default: as ``dims``.
    """

    def __init__(
        self,
        preset: Preset,
        spec: Spec,
        device: torch.device,
        run_dir: Path,
        *,
        seed: int = 0,
        batches: Callable[..., list[tuple[Tensor, Tensor]]] | None = None,
        dims: ParallelDims | None = None,
        teacher_dims: ParallelDims | None = None,
    ) -> None:
        config = bench_config(preset, spec, seed=seed)
        method = get_method(spec.method)
        self.device = device
        self.compute_dtype = compute_dtype(config.precision, device)
        seed_everything(config.seed)  # the trainer's order: teacher, then student
        models = build_run_models(
            config,
            needs_teacher=method.needs_teacher,
            model_families=method.model_families,
            tensor_parallel_families=method.tensor_parallel_families,
            device=device,
            compute_dtype=self.compute_dtype,
            dims=dims,
            teacher_dims=teacher_dims,
        )
        ctx = MethodContext(
            config=config,
            teacher=models.teacher,
            student=models.student,
            layer_map=models.layer_map,
            device=device,
            compute_dtype=self.compute_dtype,
            run_dir=run_dir,
            log=lambda _: None,
            batches=batches or (lambda _split, n, _samples=None: synthetic_batches(preset, n, CPU)),
            dims=dims,
            teacher_dims=teacher_dims,
        )
        self.data_group = dims.dp_group if dims is not None and dims.dp_size > 1 else None
        self.phase = build_benchmarked(method, ctx)
        self.module = self.phase.trained
        self.tapper = self.phase.tapper
        self.optimizer = build_optimizer(self.module, config.optim, config.optim.lr)

    @property
    def student_trunk(self) -> torch.nn.Module:
        return self.module.student

    def flops_per_token(self, seq_len: int) -> float:
        return self.phase.flops_per_token(seq_len)

    def feed(self, batches: list[tuple[Tensor, Tensor]], *, prefetch: bool) -> TeacherFeed:
        return TeacherFeed(
            _SyntheticLoader(batches),
            self.tapper,
            self.device,
            prefetch=prefetch,
            batch_draw=self.phase.batch_draw,
        )

    def step_parts(self, feed: TeacherFeed) -> Iterator[str]:
        """One step; yields after each piece (the trunk's end is marked by a hook)."""
        item = feed.next()
        yield "teacher"
        with autocast(self.device, self.compute_dtype):
            loss, _ = self.module(item.input_ids, item.labels, item.tapped, **item.draw)
        yield "losses"
        loss.backward()
        yield "backward"
        if self.data_group is not None:
            _average_gradients(self.module, self.data_group)
            yield "gradients"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        yield "optimizer"


def _average_gradients(module: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """The data-parallel gradient average, as one all-reduce of the flattened gradients (what
    ZeRO-1 and DDP's buckets move, without their overlap with the backward)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(averaged.view_as(g))


class _PieceTimer:
    """Wall-clock time of each piece, the device synchronised at every mark."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.last = 0.0

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def mark(self, piece: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.times[piece].append(now - self.last)
        self.last = now


def synthetic_batches(preset: Preset, n: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """``n`` random (input_ids, labels) pairs [B, T] on the host, pinned for a GPU run."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(
            0, preset.vocab, (preset.micro_batch, preset.seq_len + 1), generator=g
        )
        pair = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        out.append(tuple(t.pin_memory() for t in pair) if device.type == "cuda" else pair)
    return out


def measure(preset: Preset, spec: Spec, device: torch.device | None = None) -> dict:
    """Build ``spec``'s step, run it, and return its row of the benchmark (see module docstring)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = synthetic_batches(preset, 4, device)
    with tempfile.TemporaryDirectory() as run_dir:
        if spec.impl == "reference":  # the reference computes what the ted step computes
            ted = ProjectStep(preset, Spec("ted", False, False, spec.attention), CPU, Path(run_dir))
            per_token = ted.flops_per_token(preset.seq_len)
            del ted
        memory = PeakMemory(device)
        memory.reset()
        if spec.impl == "reference":
            config = bench_config(preset, spec)
            seed_everything(config.seed)
            step = ReferenceTED(
                build_teacher(config),
                paper_layer_map(preset.teacher_layers, preset.student_layers),
                alpha_kd=ALPHA_KD, alpha_layer=ALPHA_LAYER, temperature=TEMPERATURE,
                attention=spec.attention, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                device=device,
            )  # fmt: skip
            cycle = iter(batches * (preset.warmup + preset.steps + preset.instrumented))
            timed = inline = lambda: step.step_parts(*next(cycle))
        else:
            step = ProjectStep(preset, spec, device, Path(run_dir))
            per_token = step.flops_per_token(preset.seq_len)
            timed_feed = step.feed(batches, prefetch=spec.prefetch)
            inline_feed = step.feed(batches, prefetch=False)
            timed = lambda: step.step_parts(timed_feed)  # noqa: E731
            inline = lambda: step.step_parts(inline_feed)  # noqa: E731

        times = _timed_steps(timed, preset.warmup, preset.steps, cuda)
        split = _instrumented_steps(inline, step.student_trunk, preset.instrumented, device)
    step_s = min(times)
    tokens_per_s = preset.micro_batch * preset.seq_len / step_s
    tflops = per_token * tokens_per_s / 1e12
    peak = device_peak_tflops(device)
    return {
        "name": spec.name,
        **asdict(spec),
        **({"hf_class": type(step.student).__name__} if spec.impl == "reference" else {}),
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * step_s,
        "step_ms_all": [1000 * t for t in times],
        "time_split_ms": split,
        "flops_per_token": per_token,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mib": memory.peak_bytes() / 2**20,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": "bf16" if cuda else "fp32",
    }


def _timed_steps(
    step_parts: Callable[[], Iterator[str]], warmup: int, steps: int, cuda: bool
) -> list[float]:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        for _ in step_parts():
            pass
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _instrumented_steps(
    step_parts: Callable[[], Iterator[str]],
    trunk: torch.nn.Module,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    timer = _PieceTimer(device)
    hook = trunk.register_forward_hook(lambda *_: timer.mark("student_forward"))
    try:
        for _ in range(steps):
            timer.start()
            for piece in step_parts():
                timer.mark(piece)
    finally:
        hook.remove()
    return {piece: 1000 * min(timer.times[piece], default=0.0) for piece in PIECES}
