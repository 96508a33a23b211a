"""The trainer's step data-parallel over N ranks (``launch/bench_throughput.py --dp N``, launched
with N ranks): each method's plain fused step, each rank its own micro-batch and the student's
gradients averaged by one all-reduce of the flattened gradients (``ProjectStep``'s
``gradients`` piece: what DDP's buckets and ZeRO move, without their overlap), and with
``--engine`` the trainer's own loop over the same ranks (DeepSpeed at the run's ZeRO stage for N
ranks, or ``--zero-stage``). engine / plain is then the loop's cost over the plain step at the
same data-parallel size, the gradient average included in both (docs/throughput.md, "Two
data-parallel ranks")."""

from __future__ import annotations

import torch

from ted_scale.bench.presets import Preset, Spec
from ted_scale.bench.tensor_parallel import measure_tp
from ted_scale.bench.trainer_loop import measure_engine


def run_dp_suite(
    preset: Preset, methods: list[str], dp: int, *, engine: bool, zero_stage: int | None
) -> list[dict] | None:
    """Every method's fused step over the ``dp`` ranks this process group holds (``torchrun
    --nproc_per_node dp``); with ``engine`` the trainer's loop beside it. The rows on rank 0,
    None on the others."""
    from ted_scale.parallel import init_parallel
    from ted_scale.parallel.dims import ParallelLayoutError

    dims = init_parallel(1)
    if dims.dp_size != dp:
        raise ParallelLayoutError(
            f"--dp {dp} runs {dp} data-parallel ranks: launch it with exactly {dp} "
            f"(torchrun --nproc_per_node {dp}), not {dims.world_size}"
        )
    rows = []
    for method in methods:
        spec = Spec(method, True, False, "auto")
        row = measure_tp(preset, spec, dims)
        if engine:
            row |= measure_engine(preset, spec, zero_stage=zero_stage, dims=dims)
            row["engine_vs_plain"] = row["engine_tokens_per_s"] / row["tokens_per_s"]
        rows.append(row)
    return rows if dims.is_main else None


def format_dp_table(rows: list[dict]) -> str:
    """A Markdown table of ``run_dp_suite``'s rows."""
    engine = all("engine_tokens_per_s" in r for r in rows)
    head = "| configuration | tokens/s | step ms | grad sync ms | grad sync share |"
    rule = "|---|---:|---:|---:|---:|"
    if engine:
        head += " engine tokens/s | ZeRO | engine / plain |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} "
            f"| {r['grad_sync_ms']:.1f} | {100 * r['grad_sync_ms'] / r['step_ms']:.1f} % |"
        )
        if engine:
            line += (
                f" {r['engine_tokens_per_s']:,.0f} | {r['zero_stage']} "
                f"| {r['engine_vs_plain']:.3f} |"
            )
        lines.append(line)
    lines.append(f"({torch.get_num_threads()} torch threads per rank)")
    return "\n".join(lines)
