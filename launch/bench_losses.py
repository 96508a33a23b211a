"""Peak memory and time of the TED losses: fused chunked kernels vs naive full-logits PyTorch.

    python launch/bench_losses.py --preset cpu|gpt2 [--out FILE.json]

Stage I: sum over K teacher filter outputs of CE(LN -> frozen LM head). Stage II: CE + alpha1*KD
+ alpha2*D_TED with a trainable student head. Each variant (stage x fused/naive) runs forward +
backward in a fresh subprocess, so no allocator cache or earlier peak leaks between variants.
Peak memory is measured above the post-setup baseline (inputs, weights, LayerNorms already
allocated): on CUDA torch.cuda.max_memory_allocated; on CPU the process's resident-set high-water
mark (VmHWM, reset after setup through /proc/self/clear_refs) minus the resident set at that point.
Method details: ted_scale/bench/losses.py.
"""

import argparse

from ted_scale.bench.losses import PRESETS, run_suite


def main() -> None:
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
    parser.add_argument("--out", help="write the results as JSON here (default: not written)")
    args = parser.parse_args()
    run_suite(args.preset, args.out)


if __name__ == "__main__":
    main()
