"""Peak memory and time of the TED losses: fused chunked kernels vs naive full-logits PyTorch.

Stage I: sum over K teacher filter outputs of CE(LN -> frozen LM head). Stage II: CE + alpha1*KD
+ alpha2*D_TED with a trainable student head. Inputs are random (seeded), [tokens, width] hidden
states and a [vocab, width] head; bf16 on CUDA, fp32 on CPU.

Measurement, per variant (stage x fused/naive):
- it runs in a fresh interpreter (``python -m ted_scale.bench.losses --variant stage:impl``), so no
  allocator cache or earlier peak leaks between variants;
- ``iters`` forward + backward passes, each ended by a device synchronisation; the time is the
  fastest pass after the first (the first is warm-up: kernel compilation, allocator growth);
- peak memory (``PeakMemory``) above the post-setup baseline (inputs, weights and LayerNorms
  already allocated): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident-set
  high-water mark (``VmHWM``, reset after setup) minus the resident set at that point.
Ratios: naive peak / fused peak (memory saved) and fused time / naive time (time cost), per stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ted_scale.bench.peak_memory import PeakMemory
from ted_scale.kernels import default_chunk_size, fused_linear_ce_kd, fused_linear_cross_entropy

PRESETS = {
    "gpt2": {"tokens": 8192, "vocab": 50257, "width": 768, "filters": 6, "iters": 10},
    "cpu": {"tokens": 1024, "vocab": 50257, "width": 768, "filters": 6, "iters": 3},
}
# The paper's Stage II settings for GPT-2: alpha1 (KD), alpha2 (D_TED), KD temperature.
ALPHA1, ALPHA2, TEMPERATURE = 2.5, 0.1, 2.0
STAGES = ("stage1", "stage2")
VARIANTS = [(stage, impl) for stage in STAGES for impl in ("naive", "fused")]


def naive_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_t || p_s) * T^2 from full [N, V] logits."""
    log_ps = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * TEMPERATURE**2


def build_step(
    stage: str, impl: str, cfg: dict[str, int], device: str, dtype: torch.dtype
) -> Callable[[], None]:
    """Allocates the stage's inputs and returns a closure running one forward + backward."""
    n, vocab, width, k = cfg["tokens"], cfg["vocab"], cfg["width"], cfg["filters"]

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        # In-place init: no temporary that would raise the setup's memory high-water mark.
        return torch.empty(*shape, device=device, dtype=dtype).normal_().requires_grad_(grad)

    targets = torch.randint(0, vocab, (n,), device=device)
    head = randn(vocab, width).mul_(0.02).requires_grad_(stage == "stage2")
    final_ln = torch.nn.LayerNorm(width, device=device, dtype=dtype).requires_grad_(
        stage == "stage2"
    )

    if stage == "stage1":  # K teacher filter outputs -> frozen teacher LN + LM head
        filter_outputs = [randn(n, width, grad=True) for _ in range(k)]
        params = filter_outputs

        def loss_fn() -> torch.Tensor:
            hiddens = [final_ln(g) for g in filter_outputs]
            if impl == "fused":
                return sum(fused_linear_cross_entropy(h, head, targets) for h in hiddens)
            return sum(F.cross_entropy((h @ head.T).float(), targets) for h in hiddens)

    else:  # student trunk output + K filter pairs; the teacher side is frozen
        student_hidden = randn(n, width, grad=True)
        teacher_hidden = randn(n, width)
        teacher_head = randn(vocab, width).mul_(0.02)
        student_filters = [randn(n, width, grad=True) for _ in range(k)]
        teacher_filters = [randn(n, width) for _ in range(k)]
        params = [student_hidden, head, *final_ln.parameters(), *student_filters]

        def loss_fn() -> torch.Tensor:
            hidden = final_ln(student_hidden)
            d_ted = sum(map(F.mse_loss, student_filters, teacher_filters))
            if impl == "fused":
                loss = fused_linear_ce_kd(
                    hidden, head, targets, teacher_hidden, teacher_head,
                    temperature=TEMPERATURE, kd_weight=ALPHA1,
                )[0]  # fmt: skip
            else:
                student_logits = hidden @ head.T
                with torch.no_grad():
                    teacher_logits = teacher_hidden @ teacher_head.T
                ce = F.cross_entropy(student_logits.float(), targets)
                loss = ce + ALPHA1 * naive_kd(student_logits, teacher_logits)
            return loss + ALPHA2 * d_ted

    def step() -> None:
        for t in params:
            t.grad = None  # as a trainer's zero_grad(set_to_none=True)
        loss_fn().backward()

    return step


def run_variant(stage: str, impl: str, preset: str) -> dict:
    """Runs one variant in this process and returns its peak memory (MiB) and time (s)."""
    cfg = PRESETS[preset]
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    step = build_step(stage, impl, cfg, device, dtype)
    memory = PeakMemory(torch.device(device))
    memory.reset()
    times = []
    for _ in range(cfg["iters"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "stage": stage,
        "impl": impl,
        "peak_mib": memory.peak_bytes() / 2**20,
        # Best of the post-warm-up iterations: least disturbed by other load on a shared machine.
        "time_s": min(times[1:] or times),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }


def run_isolated(stage: str, impl: str, preset: str) -> dict:
    """``run_variant`` in a fresh interpreter (this module's ``main``), for a clean peak."""
    cmd = [
        sys.executable, "-m", "ted_scale.bench.losses",
        "--preset", preset, "--variant", f"{stage}:{impl}",
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> dict[str, float]:
    """Per stage: naive peak / fused peak and fused time / naive time."""
    by = {(r["stage"], r["impl"]): r for r in rows}
    out = {}
    for stage in STAGES:
        naive, fused = by[stage, "naive"], by[stage, "fused"]
        out[f"{stage}_memory_naive_over_fused"] = naive["peak_mib"] / fused["peak_mib"]
        out[f"{stage}_time_fused_over_naive"] = fused["time_s"] / naive["time_s"]
    return out


def run_suite(
    preset: str, out: str | Path | None = None, *, log: Callable[[str], None] = print
) -> dict:
    """Every variant, each in a fresh process; logs a line per variant then the ratios, and
    writes the result (preset, config with the kernels' chunk size, rows, ratios) to ``out``."""
    rows = []
    for stage, impl in VARIANTS:
        rows.append(run_isolated(stage, impl, preset))
        r = rows[-1]
        log(f"{stage:7s} {impl:6s} peak {r['peak_mib']:9.1f} MiB  time {r['time_s']:8.3f} s")

    rs = ratios(rows)
    for name, value in rs.items():
        log(f"{name:34s} {value:6.2f}x")

    cfg = PRESETS[preset]
    result = {
        "preset": preset,
        "config": {**cfg, "chunk_size": default_chunk_size(cfg["vocab"])},
        "results": rows,
        "ratios": rs,
    }
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main() -> None:
    """Worker entry: run one variant in this (fresh) process, print its row as JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument(
        "--variant", required=True, choices=[f"{s}:{i}" for s, i in VARIANTS],
        help="stage:impl",
    )  # fmt: skip
    args = parser.parse_args()
    print(json.dumps(run_variant(*args.variant.split(":"), args.preset)))


if __name__ == "__main__":
    main()
