"""Micro-batches with the teacher's outputs attached, computed one micro-batch ahead on a side CUDA
stream while the student trains on the current one.

The teacher's work depends only on the input batch (and the phase's per-batch draw, made here with
the batch so that both sides get the same one), so while the student runs forward and backward on
micro-batch i, the teacher (and its frozen filters) run on micro-batch i+1 on their own stream.
The hand-over is a CUDA event: the student's stream waits on it, not on the whole device. Tensors
made on the side stream are ``record_stream``-ed onto the consumer's stream, so the caching
allocator recycles their memory only after the student is done with them: two sets of teacher
outputs are alive at a time (double buffering) and memory stays flat. Look-ahead crosses
gradient-accumulation and optimizer-step boundaries; the loader position reported for checkpoints
is that of the last batch handed to the student, never of the prefetched one.

Without CUDA, prefetch keeps the same look-ahead order (the teacher's micro-batch i+1 is computed
before the student's micro-batch i) but runs it inline, so the hand-over and the loader bookkeeping
can be tested on a CPU; with prefetch off the teacher runs just in time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ted_scale.data.loader import DistributedBatchLoader
from ted_scale.distill.modules import BatchDraw, FrozenTapper, TappedOutputs


@dataclass
class FeedItem:
    input_ids: Tensor  # [B, T] on the training device
    labels: Tensor  # [B, T]
    tapped: TappedOutputs | None
    loader_state: dict[str, Any]  # the loader's position after this batch
    draw: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the trained side
    draw_state: dict[str, Any] | None = None  # the batch draw's state after this batch


def _batches(loader: DistributedBatchLoader) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
    """Endless (input_ids, labels, position after the batch), epoch after epoch."""
    while True:
        for input_ids, labels in loader:
            yield input_ids, labels, loader.state_dict()


def _tensors(tapped: TappedOutputs | None) -> list[Tensor]:
    """Every tensor of ``tapped``, those in list or tuple fields included (``layer_states``,
    CR-ILD's Q/K/V relations)."""
    if tapped is None:
        return []
    out = []
    for f in fields(tapped):
        value = getattr(tapped, f.name)
        out.extend(value if isinstance(value, list | tuple) else [value])
    return [t for t in out if isinstance(t, Tensor)]


class TeacherFeed:
    """``next()`` returns the next micro-batch on the device with the teacher's outputs."""

    def __init__(
        self,
        loader: DistributedBatchLoader,
        tapper: FrozenTapper | None,
        device: torch.device,
        *,
        prefetch: bool,
        batch_draw: BatchDraw | None = None,
    ) -> None:
        self.batches = _batches(loader)
        self.tapper = tapper
        self.batch_draw = batch_draw
        self.device = device
        self.prefetch = prefetch and tapper is not None
        cuda = device.type == "cuda"
        self.side_stream = torch.cuda.Stream(device) if self.prefetch and cuda else None
        self._pending: tuple[FeedItem, Any, Any] | None = None
        self._last_state = loader.state_dict()
        self._last_draw_state = batch_draw.state_dict() if batch_draw is not None else None
        self._timings: list[tuple[Any, Any, Any]] = []  # (start, end, consumer reached) events
        self._cpu_teacher_s = 0.0
        self._count = 0

    def _launch(self) -> tuple[FeedItem, Any, Any]:
        """Copy the next batch to the device and run the teacher on it (on the side stream when
        prefetching); returns the item with its start and ready events."""
        input_ids, labels, state = next(self.batches)
        draw, draw_state = {}, None
        if self.batch_draw is not None:
            draw, draw_state = self.batch_draw(input_ids), self.batch_draw.state_dict()
        cuda = self.device.type == "cuda"
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        ready = torch.cuda.Event(enable_timing=True) if cuda else None
        stream = self.side_stream or (torch.cuda.current_stream(self.device) if cuda else None)
        with torch.cuda.stream(stream) if self.side_stream else contextlib.nullcontext():
            input_ids = input_ids.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if start is not None:
                start.record(stream)
            t0 = time.perf_counter()
            tapped = self.tapper(input_ids, **draw) if self.tapper is not None else None
            if not cuda:
                self._cpu_teacher_s += time.perf_counter() - t0
            if ready is not None:
                ready.record(stream)
        return FeedItem(input_ids, labels, tapped, state, draw, draw_state), start, ready

    def next(self) -> FeedItem:
        if self.prefetch:
            item, start, ready = self._pending or self._launch()
            self._pending = self._launch()  # the teacher for the following micro-batch starts now
        else:
            item, start, ready = self._launch()
        if self.side_stream is not None:
            consumer = torch.cuda.current_stream(self.device)
            reached = torch.cuda.Event(enable_timing=True)
            reached.record(consumer)
            consumer.wait_event(ready)
            for t in (item.input_ids, item.labels, *_tensors(item.tapped)):
                t.record_stream(consumer)
            self._timings.append((start, ready, reached))
        elif start is not None and self.tapper is not None:
            self._timings.append((start, ready, start))  # same stream: all of it is exposed
        self._count += 1
        self._last_state = item.loader_state
        self._last_draw_state = item.draw_state
        return item

    def consumed_state(self) -> dict[str, Any]:
        """Loader position after the last batch handed out (a prefetched batch is not counted)."""
        return self._last_state

    def consumed_draw_state(self) -> dict[str, Any] | None:
        """The batch draw's state after the last batch handed out (None without a draw)."""
        return self._last_draw_state

    def timing(self) -> dict[str, float]:
        """Teacher milliseconds per micro-batch since the last call and, on CUDA, the fraction of
        it hidden behind the student's work. Synchronises with the recorded events."""
        if self.tapper is None or not self._count:
            return {}
        out: dict[str, float] = {}
        if self.device.type != "cuda":
            out["teacher_ms"] = 1000 * self._cpu_teacher_s / self._count
        else:
            total = exposed = 0.0
            for start, ready, reached in self._timings:
                ready.synchronize()
                teacher_ms = start.elapsed_time(ready)
                total += teacher_ms
                # The student waited only for the part of the teacher that ended after it asked.
                exposed += min(max(reached.elapsed_time(ready), 0.0), teacher_ms)
            out["teacher_ms"] = total / self._count
            out["teacher_hidden_fraction"] = 1.0 - exposed / total if total > 0 else 0.0
        self._timings.clear()
        self._cpu_teacher_s = 0.0
        self._count = 0
        return out
