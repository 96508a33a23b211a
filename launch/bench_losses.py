"""Peak memory and time of the TED losses: fused chunked kernels vs naive full-logits PyTorch.

    python launch/bench_losses.py --preset cpu|gpt2 [--out FILE.json]

Stage I: sum over K teacher filter outputs of CE(LN -> frozen LM head). Stage II: CE + alpha1*KD
+ alpha2*D_TED with a trainable student head. Each variant (stage x fused/naive) runs forward +
backward in a fresh subprocess, so no allocator cache or earlier peak leaks between variants.
Peak memory is measured above the post-setup baseline (inputs, weights, LayerNorms already
allocated): on CUDA torch.cuda.max_memory_allocated; on CPU the process's resident-set high-water
mark (VmHWM, reset after setup through /proc/self/clear_refs) minus the resident set at that point.
"""

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from ted_scale.kernels import default_chunk_size, fused_linear_ce_kd, fused_linear_cross_entropy

from ted_scale.bench.memory import PeakMemory

PRESETS = {
    "gpt2": {"tokens": 8192, "vocab": 50257, "width": 768, "filters": 6, "iters": 10},
    "cpu": {"tokens": 1024, "vocab": 50257, "width": 768, "filters": 6, "iters": 3},
}
ALPHA1, ALPHA2, TEMPERATURE = 2.5, 0.1, 2.0
VARIANTS = [(stage, impl) for stage in ("stage1", "stage2") for impl in ("naive", "fused")]


def naive_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_t || p_s) * T^2 from full [N, V] logits."""
    log_ps = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * TEMPERATURE**2


def build_step(stage: str, impl: str, cfg: dict, device: str, dtype: torch.dtype) -> Callable:
    """Allocates the stage's inputs and returns a closure running one forward + backward."""
    n, vocab, width, k = cfg["tokens"], cfg["vocab"], cfg["width"], cfg["filters"]

    def randn(*shape, grad=False):
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

        def loss_fn():
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

        def loss_fn():
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

    def step():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: "stage:impl"
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(*args.variant.split(":"), args.preset)))
        return

    rows = []
    for stage, impl in VARIANTS:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--variant", f"{stage}:{impl}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{stage:7s} {impl:6s} peak {r['peak_mib']:9.1f} MiB  time {r['time_s']:8.3f} s")

    by = {(r["stage"], r["impl"]): r for r in rows}
    ratios = {}
    for stage in ("stage1", "stage2"):
        naive, fused = by[stage, "naive"], by[stage, "fused"]
        ratios[f"{stage}_memory_naive_over_fused"] = naive["peak_mib"] / fused["peak_mib"]
        ratios[f"{stage}_time_fused_over_naive"] = fused["time_s"] / naive["time_s"]
    for name, value in ratios.items():
        print(f"{name:34s} {value:6.2f}x")

    cfg = PRESETS[args.preset]
    result = {
        "preset": args.preset,
        "config": {**cfg, "chunk_size": default_chunk_size(cfg["vocab"])},
        "results": rows,
        "ratios": ratios,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
