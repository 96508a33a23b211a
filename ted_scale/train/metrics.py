"""Where a run reports: ``metrics.jsonl``, TensorBoard scalars and a console progress bar.

Only the main rank writes. Loss parts arrive as tensors and are synchronised with the host once per
log interval, never once per micro-batch. ``StepLog`` owns the logging cadence of one phase.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ted_scale.io import atomic_write_text
from ted_scale.train.run_dir import RunFileError


class LossAverager:
    """Sums detached loss tensors on the device between log lines; one host sync per ``pop``.

    group: the data-parallel group the means are averaged over (None: no averaging).
    """

    def __init__(self, group: torch.distributed.ProcessGroup | None = None) -> None:
        self.group = group
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, parts: dict[str, Tensor]) -> None:
        for key, value in parts.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def pop(self) -> dict[str, float]:
        """Means since the last pop, averaged over data-parallel ranks too."""
        if not self.count:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / self.count
        if self.group is not None:
            torch.distributed.all_reduce(stacked, group=self.group)
            stacked /= torch.distributed.get_world_size(self.group)
        self.sums.clear()
        self.count = 0
        return dict(zip(keys, stacked.tolist(), strict=True))


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as e:  # a full disk fails the write with no path: name the file
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(f"{record['stage']}/{key}", value, step)
            self.tb.flush()

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop lines of ``stage`` logged after ``step`` (the checkpoint being resumed, or 0 for a
        stage that starts afresh), so none appear twice; also a last line that a kill cut short.
        """
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):  # a line half-written by a killed run
                    continue
                raise RunFileError(
                    f"{self.path}:{number}: damaged, not a JSON metrics line. The file is a log, "
                    f"the checkpoints are the run's state: delete line {number}, or move the "
                    f"file aside (mv {self.path} {self.path}.damaged; the resume starts a new "
                    "one), then run again with resume=auto"
                ) from None
            if record.get("stage") == stage and record.get("step", 0) > step:
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Tokens/s (all ranks together), TFLOP/s and MFU per device over the last log interval.

    ``flops_per_token``: the FLOPs one rank spends per token of its data-parallel share, counted
    from its own modules (under tensor parallelism its shards, so about 1/tp of the model's);
    each of the ``data_parallel_size`` shares is a 1/data_parallel_size part of the tokens.
    """

    def __init__(
        self, flops_per_token: float, data_parallel_size: int, peak_tflops: float | None
    ) -> None:
        self.flops_per_token = flops_per_token
        self.data_parallel_size = data_parallel_size
        self.peak_tflops = peak_tflops
        self.start = time.perf_counter()
        self.tokens = 0

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def pop(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed  # global: every rank adds the same count
        tflops_per_gpu = tokens_per_s * self.flops_per_token / self.data_parallel_size / 1e12
        out = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops_per_gpu}
        if self.peak_tflops:
            out["mfu"] = tflops_per_gpu / self.peak_tflops
        self.start = time.perf_counter()
        self.tokens = 0
        return out


class StepLog:
    """One phase's metrics: loss parts averaged per micro-batch, a line every ``interval`` steps
    and at the last one (``step``, ``stage`` = the phase, losses, ``lr``, throughput, extras), and
    the progress bar."""

    def __init__(
        self,
        writer: MetricsWriter,
        phase: str,
        *,
        interval: int,
        total_steps: int,
        start_step: int,
        throughput: Throughput,
        group: torch.distributed.ProcessGroup | None,
        show_bar: bool,
    ) -> None:
        self.writer = writer
        self.phase = phase
        self.interval = interval
        self.total_steps = total_steps
        self.throughput = throughput
        self.losses = LossAverager(group)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=phase,
            unit="step",
            disable=not show_bar,
            dynamic_ncols=True,
        )

    def add(self, parts: dict[str, Tensor]) -> None:
        """One micro-batch's loss parts (detached tensors)."""
        self.losses.add(parts)

    def due(self, step: int) -> bool:
        """Whether ``step`` writes a metrics line: every ``interval`` steps and the last one."""
        return step % self.interval == 0 or step == self.total_steps

    def step_done(self, step: int, tokens: int, extras) -> None:
        """Count ``tokens``; at the cadence, write the line (``extras()`` adds lr, timings...)."""
        self.throughput.add_tokens(tokens)
        self.bar.update(1)
        if not self.due(step):
            return
        record = {"step": step, "stage": self.phase, **self.losses.pop()}
        record.update(**extras(), **self.throughput.pop())
        self.writer.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")

    def close(self) -> None:
        self.bar.close()
