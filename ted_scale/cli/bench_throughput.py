"""Throughput of a training step per method against a plain `transformers` TED reference.

    python launch/bench_throughput.py --preset cpu|cpu-wide|cpu-llama|gpt2 [--out FILE.json]
    torchrun --nproc_per_node N launch/bench_throughput.py --tp N --preset cpu|gpt2
    torchrun --nproc_per_node N launch/bench_throughput.py --teacher-tp N --preset cpu|gpt2
    torchrun --nproc_per_node N launch/bench_throughput.py --dp N [--engine [--zero-stage S]]

Synthetic token batches, random weights. For each configuration (method x fused loss x teacher
prefetch x attention, plus the reference in the HF class of the preset's family): tokens/s, the
step split into teacher / student forward / losses / backward / optimizer, achieved TFLOP/s
(ted_scale.flops), MFU on a GPU, peak memory, and ratios to the reference and to the
student-alone step. Each configuration runs in a fresh
process. Method details: ted_scale/bench/throughput.py; targets: ted_scale/bench/throughput_suite.py.
With --tp N (N ranks, one tensor-parallel group; gloo on CPU): each method's fused step sharded
over the N ranks, with the share of the step spent in tensor-parallel communication and each
rank's parameter and optimizer bytes (ted_scale/bench/tensor_parallel.py). With --teacher-tp N
(N ranks): beside that shared layout, each method that supports it with the teacher alone split over
the N ranks and the student data-parallel over them (each rank its own micro-batch): tokens/s of
the N ranks together, the time the student waits for the teacher, and the gradient all-reduce.
"""

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ted_scale.bench.presets import PRESETS
from ted_scale.bench.throughput_suite import configurations, format_table, run_suite
from ted_scale.distill.methods import method_names
from ted_scale.io import atomic_write_json
from ted_scale.model.attention import IMPLEMENTATIONS


def _choices(allowed):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu",
        help="model and batch sizes: gpt2 = the paper's 12x768 -> 6 layers, seq 1024, batch 8 (GPU); "
        "cpu = GPT-2 vocabulary, 4x256 -> 2 layers, seq 128, batch 4; cpu-wide = cpu at GPT-2's "
        "width (4x768 -> 2 layers); cpu-llama = cpu with Llama "
        "blocks (GQA 4:2, SwiGLU 768 wide, RMSNorm, RoPE, untied head), against transformers' "
        "LlamaForCausalLM; micro, micro-llama = smoke tests",
    )  # fmt: skip
    parser.add_argument(
        "--methods", type=_choices(method_names()), default=method_names(),
        help="comma-separated registered methods (lm = the student alone, plain CE)",
    )  # fmt: skip
    parser.add_argument(
        "--fused", type=_choices(("on", "off")), default=["on", "off"],
        help="fused chunked LM-head losses (on) and/or full-logits PyTorch losses (off)",
    )  # fmt: skip
    parser.add_argument(
        "--prefetch", type=_choices(("on", "off")), default=None,
        help="teacher prefetch on a side CUDA stream; on CPU the teacher always runs inline "
        "[default: on,off on CUDA, off on CPU]",
    )  # fmt: skip
    parser.add_argument(
        "--attention", type=_choices(IMPLEMENTATIONS), default=["auto"],
        help="comma-separated attention kernels (auto, sdpa, flash, eager); the reference runs "
        "once per kernel with HF's equivalent",
    )  # fmt: skip
    parser.add_argument(
        "--compile", type=_choices(("on", "off")), default=None,
        help="torch.compile the student and teacher blocks (model.compile) "
        "[default: on,off on CUDA, off on CPU]",
    )  # fmt: skip
    parser.add_argument(
        "--engine", action="store_true",
        help="also run the trainer's own loop (DeepSpeed engine, loader on a synthetic shard set) "
        "per configuration and report its tokens/s beside the plain step's",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads per configuration [default: torch's, one per core]; on a machine "
        "shared with other work, fewer threads than cores keep OpenMP from stalling",
    )  # fmt: skip
    parser.add_argument(
        "--tp", type=int, default=None,
        help="tensor-parallel size: time each method's fused step sharded over the N ranks this "
        "is launched with (torchrun --nproc_per_node N; 1 = plain python) in one process per rank",
    )  # fmt: skip
    parser.add_argument(
        "--teacher-tp", type=int, default=None,
        help="as --tp N, and also each method with the teacher alone split over the N ranks and "
        "the student data-parallel over them (parallel.teacher_tensor_parallel_size)",
    )  # fmt: skip
    parser.add_argument(
        "--dp", type=int, default=None,
        help="data-parallel size: time each method's fused step over the N ranks this is launched "
        "with (torchrun --nproc_per_node N), each rank its own micro-batch and the gradients "
        "averaged by one all-reduce; with --engine also the trainer's loop over the same ranks",
    )  # fmt: skip
    parser.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
        help="with --dp and --engine: the trainer's deepspeed.zero_stage [default: the run "
        "default, 1 over several data-parallel ranks]",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="JSON output [default: runs/bench/throughput-<preset>.json]",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.zero_stage is not None and not (args.dp and args.engine):
        parser.error("--zero-stage sets the trainer's stage for --dp N --engine: give both")
    if args.dp is not None:
        if args.tp is not None or args.teacher_tp is not None:
            parser.error("--dp times unsplit models: give --dp, --tp or --teacher-tp, one of them")
        _data_parallel(args)
        return 0
    if args.teacher_tp is not None:
        if args.tp not in (None, args.teacher_tp):
            parser.error(f"--tp {args.tp} with --teacher-tp {args.teacher_tp}: give one size")
        _tensor_parallel(args, args.teacher_tp, teacher_tp=True)
        return 0
    if args.tp is not None:
        _tensor_parallel(args, args.tp)
        return 0

    cuda = torch.cuda.is_available()
    prefetch = args.prefetch or (["on", "off"] if cuda else ["off"])
    compile_ = args.compile or (["on", "off"] if cuda else ["off"])
    specs = configurations(
        args.methods, [f == "on" for f in args.fused], [p == "on" for p in prefetch],
        args.attention, cuda=cuda, compile=[c == "on" for c in compile_],
    )  # fmt: skip
    print(f"{len(specs)} configurations, each in a fresh process:")
    result = run_suite(args.preset, specs, threads=args.threads, engine=args.engine)
    print()
    _report(format_table(result), result, args.out, args.preset)
    return 0


def _data_parallel(args: argparse.Namespace) -> None:
    from ted_scale.bench.data_parallel import format_dp_table, run_dp_suite

    suite = functools.partial(
        run_dp_suite, PRESETS[args.preset], args.methods, args.dp, engine=args.engine,
        zero_stage=args.zero_stage,
    )  # fmt: skip
    _on_ranks(args, suite, format_dp_table, f"dp{args.dp}")


def _tensor_parallel(args: argparse.Namespace, tp: int, *, teacher_tp: bool = False) -> None:
    from ted_scale.bench.tensor_parallel import format_tp_table, run_tp_suite

    suite = functools.partial(
        run_tp_suite, PRESETS[args.preset], args.methods, tp, teacher_tp=teacher_tp
    )
    _on_ranks(args, suite, format_tp_table, f"teacher-tp{tp}" if teacher_tp else f"tp{tp}")


def _on_ranks(
    args: argparse.Namespace,
    suite: Callable[[], list[dict] | None],
    table: Callable[[list[dict]], str],
    layout: str,
) -> None:
    """Run a suite on every rank of the launch; rank 0 reports its rows."""
    from ted_scale.parallel.dims import close_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = suite()
    close_parallel()
    if rows is not None:  # rank 0
        _report(table(rows), rows, args.out, f"{args.preset}-{layout}")


def _report(table: str, result: object, out: Path | None, name: str) -> None:
    """Print the table and write the result as JSON (``--out``, else
    ``runs/bench/throughput-<name>.json``)."""
    print(table)
    out = out or Path("runs/bench") / f"throughput-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
