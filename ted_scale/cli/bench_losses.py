"""Peak memory and time of the TED losses: fused chunked kernels vs naive full-logits PyTorch.

    python launch/bench_losses.py --preset cpu|gpt2 [--out FILE.json]
    python launch/bench_losses.py --kernel-report [--out FILE.json]

Stage I: sum over K teacher filter outputs of CE(LN -> frozen LM head). Stage II: CE + alpha1*KD
+ alpha2*D_TED with a trainable student head. Each variant (stage x fused/naive) runs forward +
backward in a fresh subprocess, so no allocator cache or earlier peak leaks between variants.
Peak memory is measured above the post-setup baseline (inputs, weights, LayerNorms already
allocated): on CUDA torch.cuda.max_memory_allocated; on CPU the process's resident-set high-water
mark (VmHWM, reset after setup through /proc/self/clear_refs) minus the resident set at that point.
Method details: ted_scale/bench/losses.py.

--kernel-report instead compiles every Triton kernel ahead of time for sm_80 and sm_90 (no GPU
needed) at its gpt2 and configs/tiny-*.yaml launch configurations and prints registers, spills,
shared memory and an H100 roofline per kernel and target (ted_scale/bench/kernel_report.py).
"""

import argparse
import sys

from ted_scale.bench.losses import PRESETS, run_suite
from ted_scale.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = "; ".join(
        f"{name} = {c['tokens']} tokens, vocab {c['vocab']}, width {c['width']}, "
        f"{c['filters']} filters, {c['iters']} iterations"
        for name, c in sorted(PRESETS.items())
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu",
        help=f"problem sizes: {sizes} (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--kernel-report", action="store_true",
        help="compile the Triton kernels for sm_80/sm_90 and report their resources and roofline "
        "instead of running the benchmark (exit status 1 if a kernel spills)",
    )  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here (default: not written)")
    args = parser.parse_args(argv)
    if not args.kernel_report:
        run_suite(args.preset, args.out)
        return 0
    # Imported here: it needs triton, which the memory benchmark does not.
    from ted_scale.bench.kernel_report import build_report, default_problems, format_report

    rows = build_report(default_problems())
    print(format_report(rows))
    if args.out:
        atomic_write_json(args.out, rows)
    return 1 if any(r["violations"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
