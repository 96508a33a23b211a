"""GPU memory per rank of a run at several tensor-parallel sizes, from its config (no GPU needed).

    python launch/estimate_memory.py --config configs/gpt2-xl-ted-owt.yaml --world 10 --tp 1,5
    python launch/estimate_memory.py --config configs/gpt2-xl-ted-owt.yaml --world 8 --tp 1,4 \
        --teacher-tp 4

Counts teacher, student, gradients, optimizer state, the method's modules (filters, projections)
and one micro-batch's activations from the models' shapes (ted_scale/train/memory_check.py;
docs/tensor_parallel.md, "Memory per GPU") and prints a Markdown table in GiB.
"""

from __future__ import annotations

import argparse
import math
import sys

from ted_scale.config import ConfigError
from ted_scale.distill.methods import load_run_config
from ted_scale.model.student import ModelMismatchError
from ted_scale.train.memory_check import run_memory_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    p.add_argument(
        "--tp",
        help="comma-separated tensor-parallel sizes, one column each "
        "(default: 1 and the config's parallel.tensor_parallel_size)",
    )
    p.add_argument(
        "--world", type=int, help="GPUs in all (default: the least common multiple of the sizes)"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (default 1024)")
    p.add_argument(
        "--gpu-gib",
        default="39.6,79.6",
        help="comma-separated GPU memory sizes in GiB to check against "
        "(default 39.6,79.6: the 40 and 80 GB A100/H100)",
    )
    p.add_argument("--sp", action="store_true", help="also each tp > 1 with sequence parallelism")
    p.add_argument(
        "--teacher-tp",
        help="comma-separated sizes of a teacher split apart, one column each: the teacher over "
        "groups of that many GPUs, the student data-parallel over all of them",
    )
    p.add_argument("overrides", nargs="*", help="config overrides as key.subkey=value")
    args = p.parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        tps = (
            [int(t) for t in args.tp.split(",")]
            if args.tp
            else sorted({1, config.parallel.tensor_parallel_size})
        )
        teacher_tps = [int(t) for t in args.teacher_tp.split(",")] if args.teacher_tp else []
        world = args.world or math.lcm(*tps, *teacher_tps)
        print(
            run_memory_table(
                config,
                tps=tps,
                world=world,
                seq_len=args.seq_len,
                gpus_gib=[float(g) for g in args.gpu_gib.split(",")],
                with_sp=args.sp,
                teacher_tps=teacher_tps,
            )
        )
    except (ConfigError, ModelMismatchError, ValueError) as e:
        print(f"estimate_memory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
