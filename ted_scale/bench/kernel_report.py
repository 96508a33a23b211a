"""What the Triton loss kernels cost on a GPU, without one: resources and a roofline per kernel.

Every kernel of ``ted_scale/kernels/triton_ops.py`` is compiled ahead of time (``ted_scale.kernels.aot``) for
sm_80 (A100) and sm_90 (H100) at the launch configuration it gets for

- the ``gpt2`` problem: V = 50,257, d = 768 (``bench/losses.py``'s gpt2 preset), bf16 logits
  (``precision: auto|bf16`` on CUDA) and fp32 logits (``precision: fp32``);
- each distinct problem of ``configs/tiny-*.yaml`` (V = 512): logits in the config's precision.

Per kernel and target it reports registers per thread, spill stores / loads and stack (``ptxas
-v``), shared memory, and a static estimate of bytes moved and FLOPs per row with the roofline
time per row and per chunk (``default_chunk_size(V)`` rows, at most a micro-batch's tokens) at
H100 HBM bandwidth and bf16 dense peak. The estimate counts every pass over the row in HBM (no
L2 reuse between the two sweeps: an upper bound on traffic) and one FLOP per element-wise op
(exp and log included). Beside it, the chunk's LM-head matmuls at peak, to show the kernel's share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ted_scale.bench.losses import PRESETS as LOSS_PRESETS
from ted_scale.distill.methods import load_run_config
from ted_scale.kernels import default_chunk_size, triton_ops
from ted_scale.kernels.aot import MAX_SHARED_BYTES, CompiledKernel, compile_launch
from ted_scale.kernels.torch_ops import stats_width
from ted_scale.precision import compute_dtype, storage_dtype

TARGETS = (80, 90)
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16 tensor cores
TINY_CONFIGS = "configs/tiny-*.yaml"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
_NOT_SHOWN = ("kernel", "ptxas_log")  # the row names the launch; the log stays in the cache


@dataclass(frozen=True)
class KernelCost:
    """Static cost of one kernel per logits row of V elements (counted from triton_ops.py)."""

    passes: int  # full passes over a [V] logits row in HBM: reads + writes
    ops_per_element: int  # element-wise ops per logit (compare, select, exp, ... one each)
    row_bytes: int  # per-row scalars: targets (int64), row weights and losses (fp32)
    matmuls: int  # [rows, d] x [d, V] matmuls per chunk around the kernel (fwd + both grads)


COSTS = {
    # Sweep 1 reads x (max, sub, exp, sum; ==, where, sum: 7); sweep 2 reads x and writes the
    # gradient (sub, exp, ==, where, sub, mul: 6). Logits, grad_hidden and grad_weight matmuls.
    "cross_entropy": KernelCost(passes=3, ops_per_element=13, row_bytes=8 + 4 + 4, matmuls=3),
    # Sweep 1 reads x and t (2 scales, 2 masks, two online lse steps of 4, (t - x) * e_b summed:
    # 14); sweep 2 reads both, writes the gradient (2 scales, 2 subs, 2 exps, sub, mul: 8). The
    # teacher's logits matmul comes on top of the student's three.
    "kl_div": KernelCost(passes=5, ops_per_element=22, row_bytes=4 + 4, matmuls=4),
    # As kl_div, plus CE on the unscaled logits: sweep 1 + 8 (mask, lse step, ==, where, sum),
    # sweep 2 + 7 (sub, exp, ==, where, sub, mul, add).
    "ce_kl_div": KernelCost(passes=5, ops_per_element=37, row_bytes=8 + 4 + 4 + 4, matmuls=4),
    # The vocabulary-parallel split (one shard's V columns): a statistics sweep that only reads,
    # and a gradient sweep that reads again and writes. The chunk's matmuls are counted with the
    # statistics kernel. CE stats: masked online lse step (5), ==, where, sum (3); 3 fp32 stats.
    "cross_entropy_stats": KernelCost(passes=1, ops_per_element=8, row_bytes=8 + 4 + 12, matmuls=3),
    # CE grad: sub, exp, mul, ==, where, sub; reads target, weight and lse.
    "cross_entropy_grad": KernelCost(passes=2, ops_per_element=6, row_bytes=8 + 4 + 4, matmuls=0),
    # KD stats: a = x/T (mul, where) and its lse step (4); b (mul, where), max, sub, exp, sum,
    # (t - x) * e_b summed (3); 5 fp32 stats. KD grad: 2 scales, 2 subs, 2 exps, sub, mul.
    "kl_div_stats": KernelCost(passes=2, ops_per_element=15, row_bytes=20, matmuls=4),
    "kl_div_grad": KernelCost(passes=3, ops_per_element=8, row_bytes=12, matmuls=0),
    # Both: the CE sweeps' ops on top of KD's (grad: sub, exp, mul, add, ==, where, sub).
    "ce_kl_div_stats": KernelCost(passes=2, ops_per_element=23, row_bytes=8 + 4 + 32, matmuls=4),
    "ce_kl_div_grad": KernelCost(passes=3, ops_per_element=15, row_bytes=8 + 4 + 16, matmuls=0),
    # The other KD divergences (`divergences.py`, after the kl_div statistics kernel gave the lse):
    # a sums sweep reading x and t, a gradient sweep reading both and writing over t. Common to
    # every sums sweep: log p_s and log p_t (4), 2 exps, delta, 2 masks, 2 sums (11); to every
    # gradient sweep: the logs (4), 2 exps, delta, scale * (g - p_s * sum g) (3) (10). Each
    # expm1 / log1p counts as its series' multiply-adds plus the exact branch (15 / 17 ops), so
    # `_to` is 20 ops. Rows: lse (8) and the two sums (8); lse, sum g and scale (16).
    "reverse_kl_sums": KernelCost(passes=2, ops_per_element=11 + 25, row_bytes=16, matmuls=4),
    "reverse_kl_grad": KernelCost(passes=3, ops_per_element=10 + 2, row_bytes=16, matmuls=0),
    # log(m / p_t) on both sides of 0 (two expm1, two log1p: ~73), then JSD's terms with two `_to`.
    "jsd_sums": KernelCost(passes=2, ops_per_element=11 + 126, row_bytes=16, matmuls=4),
    "jsd_grad": KernelCost(passes=3, ops_per_element=10 + 76, row_bytes=16, matmuls=0),
    "tvd_sums": KernelCost(passes=2, ops_per_element=11 + 9, row_bytes=16, matmuls=4),
    "tvd_grad": KernelCost(passes=3, ops_per_element=10 + 7, row_bytes=16, matmuls=0),
}
# The divergences that run the generic kernels (forward KL has its fused ones).
GENERIC_DIVERGENCES = ("reverse_kl", "jsd", "tvd")


@dataclass(frozen=True)
class Problem:
    """A loss problem the kernels are launched on: vocabulary, widths, rows per chunk, dtypes."""

    name: str
    vocab: int
    width: int
    tokens: int  # per micro-batch: B * T
    dtypes: tuple[torch.dtype, ...]

    @property
    def chunk_rows(self) -> int:
        return min(default_chunk_size(self.vocab), self.tokens)


def gpt2_problem() -> Problem:
    cfg = LOSS_PRESETS["gpt2"]
    return Problem(
        "gpt2", cfg["vocab"], cfg["width"], cfg["tokens"], (torch.bfloat16, torch.float32)
    )


def config_problems(pattern: str = TINY_CONFIGS, root: str | Path = ".") -> list[Problem]:
    """One problem per distinct (vocab, width, tokens, dtype) among the run configs matching
    ``pattern`` under ``root``; logits in the dtype the config's precision gives on CUDA."""
    found: dict[tuple, list[str]] = {}
    for path in sorted(Path(root).glob(pattern)):
        cfg = load_run_config(path)
        arch = cfg.teacher.arch
        dtype = storage_dtype(compute_dtype(cfg.precision, torch.device("cuda")))
        key = (arch.vocab_size, arch.n_embd, cfg.batch.micro_batch_size * arch.n_positions, dtype)
        found.setdefault(key, []).append(path.stem)
    if not found:
        raise FileNotFoundError(f"no run config matches {Path(root) / pattern}")
    return [
        Problem("+".join(names), vocab, width, tokens, (dtype,))
        for (vocab, width, tokens, dtype), names in found.items()
    ]


def launches(problem: Problem, dtype: torch.dtype) -> dict[str, triton_ops.Launch]:
    """Each kernel's GPU launch for one chunk of ``problem`` (meta tensors: nothing allocated).
    Temperature, KD weight and JSD's beta are fp32 arguments, never specialised on: any value
    compiles alike; the divergence is a constexpr, so each generic one is its own compile.
    The vocabulary-parallel pairs are launched over all V columns: a shard's V_r only changes the
    loop count, and the block (4096 from V = 8192 on) too once V_r < 4096 (tiny configs at TP)."""
    n, vocab = problem.chunk_rows, problem.vocab

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    logits, teacher = empty(n, vocab, dtype=dtype), empty(n, vocab, dtype=dtype)
    targets, rows = empty(n, dtype=torch.long), empty(n)
    split = {}  # the vocabulary-parallel pair for CE, KD and both (the shard's V columns)
    for name, ce, kd in (("cross_entropy", True, False), ("kl_div", False, True),
                         ("ce_kl_div", True, True)):  # fmt: skip
        args = (targets, rows) if ce else (None, None)
        stats = empty(n, stats_width(ce, kd))
        split[f"{name}_stats"] = triton_ops.shard_stats_launch(
            logits, *args, teacher if kd else None, stats, 2.0
        )
        split[f"{name}_grad"] = triton_ops.shard_grad_launch(
            logits, *args, empty(n, 3), teacher if kd else None, rows if kd else None, 2.0
        )
    lse = empty(n, 2)
    for divergence in GENERIC_DIVERGENCES:
        split[f"{divergence}_sums"] = triton_ops.divergence_sums_launch(
            logits, teacher, lse, lse, 2.0, divergence, 0.5
        )
        split[f"{divergence}_grad"] = triton_ops.divergence_grad_launch(
            logits, teacher, lse, rows, rows, 2.0, divergence, 0.5
        )
    return {
        "cross_entropy": triton_ops.cross_entropy_launch(logits, targets, rows, empty(n)),
        "kl_div": triton_ops.kl_div_launch(
            logits, teacher, None, rows, empty(n), empty(n), 2.0, 1.0
        ),
        "ce_kl_div": triton_ops.kl_div_launch(
            logits, teacher, targets, rows, empty(n), empty(n), 2.0, 2.5
        ),
        **split,
    }


def roofline(kernel: str, problem: Problem, dtype: torch.dtype) -> dict[str, float]:
    """Static bytes and FLOPs per row, and H100 roofline times per row and per chunk (µs)."""
    cost, vocab, rows = COSTS[kernel], problem.vocab, problem.chunk_rows
    row_bytes = cost.passes * vocab * dtype.itemsize + cost.row_bytes
    row_flops = cost.ops_per_element * vocab
    row_s = max(row_bytes / H100_BANDWIDTH, row_flops / H100_BF16_PEAK)
    matmul_flops = cost.matmuls * 2 * rows * problem.width * vocab
    return {
        "bytes_per_row": row_bytes,
        "flops_per_row": row_flops,
        "intensity": row_flops / row_bytes,
        "us_per_row": 1e6 * row_s,
        "chunk_rows": rows,
        "us_per_chunk": 1e6 * row_s * rows,
        "matmul_us_per_chunk": 1e6 * matmul_flops / H100_BF16_PEAK,
    }


def violations(compiled: CompiledKernel) -> list[str]:
    """Why this compiled (hot) kernel is unfit for a launch: spills, registers, shared memory."""
    out = []
    if compiled.spills:
        out.append(
            f"spills {compiled.spill_store_bytes} B stored / {compiled.spill_load_bytes} B loaded"
        )
    if compiled.registers > compiled.max_registers:
        out.append(f"{compiled.registers} registers > {compiled.max_registers} per thread")
    if compiled.shared_bytes > MAX_SHARED_BYTES[compiled.capability]:
        out.append(f"{compiled.shared_bytes} B shared > {MAX_SHARED_BYTES[compiled.capability]}")
    return out


def build_report(
    problems: Iterable[Problem],
    targets: Iterable[int] = TARGETS,
    *,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """One row per problem x dtype x kernel x target: the compile's resources and the roofline."""
    rows = []
    for problem in problems:
        for dtype in problem.dtypes:
            for kernel, launch in launches(problem, dtype).items():
                for capability in targets:
                    log(f"compiling {kernel} {problem.name} {_DTYPE_NAMES[dtype]} sm_{capability}")
                    compiled = compile_launch(launch, capability)
                    rows.append({
                        "problem": problem.name,
                        "vocab": problem.vocab,
                        "dtype": _DTYPE_NAMES[dtype],
                        "kernel": kernel,
                        "target": f"sm_{capability}",
                        "block": launch.args["BLOCK"],
                        **{k: v for k, v in asdict(compiled).items() if k not in _NOT_SHOWN},
                        "max_registers": compiled.max_registers,
                        "violations": violations(compiled),
                        **roofline(kernel, problem, dtype),
                    })  # fmt: skip
    return rows


def format_report(rows: list[dict]) -> str:
    """The console table: resources per target, then the per-row cost and roofline."""
    header = (
        f"{'problem':28s} {'kernel':19s} {'dtype':5s} {'target':6s} {'warps':>5s} {'BLOCK':>6s} "
        f"{'regs':>8s} {'spill st/ld':>11s} {'smem B':>7s} {'B/row':>8s} {'FLOP/row':>9s} "
        f"{'FLOP/B':>6s} {'us/row':>7s} {'rows':>5s} {'us/chunk':>8s} {'mm us/chunk':>11s}"
    )
    lines = [
        f"H100 roofline: {H100_BANDWIDTH / 1e12:.2f} TB/s, {H100_BF16_PEAK / 1e12:.0f} TFLOP/s "
        "bf16; bytes count both sweeps in HBM, one FLOP per element-wise op",
        header,
    ]
    for r in rows:
        lines.append(
            f"{r['problem']:28s} {r['kernel']:19s} {r['dtype']:5s} {r['target']:6s} "
            f"{r['num_warps']:5d} {r['block']:6d} {r['registers']:4d}/{r['max_registers']:<3d} "
            f"{r['spill_store_bytes']:5d}/{r['spill_load_bytes']:<5d} {r['shared_bytes']:7d} "
            f"{r['bytes_per_row']:8d} {r['flops_per_row']:9d} {r['intensity']:6.2f} "
            f"{r['us_per_row']:7.4f} {r['chunk_rows']:5d} {r['us_per_chunk']:8.2f} "
            f"{r['matmul_us_per_chunk']:11.2f}"
        )
    bad = [r for r in rows if r["violations"]]
    lines.append("")
    lines.append(
        f"{len(rows) - len(bad)}/{len(rows)} compiles fit their target (no spills, registers and "
        "shared memory within one block's share)"
    )
    for r in bad:
        lines.append(f"  UNFIT {r['kernel']} {r['problem']} {r['dtype']} {r['target']}: "
                     + "; ".join(r["violations"]))  # fmt: skip
    return "\n".join(lines)


def family_problems() -> list[Problem]:
    """The Llama family's large vocabularies, bf16, 8 x 1024 tokens a micro-batch: Llama 3's
    128,256 ids at Llama-3.2-1B's width 2048, and Qwen's 151,936 embedding rows at
    Qwen2.5-0.5B's width 896 (the losses cover the 151,665 ids: a launch over fewer columns)."""
    return [
        Problem("llama3", 128_256, 2048, 8192, (torch.bfloat16,)),
        Problem("qwen2.5", 151_936, 896, 8192, (torch.bfloat16,)),
    ]


def default_problems(root: str | Path = ".") -> list[Problem]:
    """The gpt2 problem, the Llama family's vocabularies and the tiny configs' problems
    (configs/ under ``root``)."""
    return [gpt2_problem(), *family_problems(), *config_problems(TINY_CONFIGS, root)]
