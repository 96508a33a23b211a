"""Every Triton loss kernel compiled ahead of time for sm_80 and sm_90, no GPU needed.

Each kernel is compiled at the launch configuration it gets for the gpt2 problem (V = 50,257, bf16
and fp32 logits) and for configs/tiny-*.yaml, by Triton and its bundled ptxas; a hot kernel that
spills fails. Results are cached by Triton's cache key (``ted_scale.kernels.aot.cache_dir``), so
only changed kernels are compiled again (about 2 s per kernel and target on a cold cache).
"""

import os
from pathlib import Path

import pytest
import torch
import triton

from ted_scale.bench.kernel_report import (
    GENERIC_DIVERGENCES,
    H100_BANDWIDTH,
    build_report,
    default_problems,
    launches,
    violations,
)
from ted_scale.kernels import triton_ops
from ted_scale.kernels.aot import compile_launch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton's compiler, not its interpreter"
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> list[dict]:
    return build_report(default_problems(REPO))


def test_every_kernel_compiles_for_both_targets_at_every_problem(report):
    problems = default_problems(REPO)
    # gpt2, Llama 3 and Qwen's vocabularies, and the tiny configs'
    assert {p.vocab for p in problems} == {50257, 128_256, 151_936, 512}
    # Every @triton.jit kernel of triton_ops (the helpers they call are not launched) is covered.
    kernels = {f for f in vars(triton_ops).values() if isinstance(f, triton.JITFunction)}
    launched = {launch.kernel for launch in launches(problems[0], torch.bfloat16).values()}
    assert launched == {f for f in kernels if f.__name__.endswith("_kernel")}

    losses = ("cross_entropy", "kl_div", "ce_kl_div")
    # The fused kernels, and the vocabulary-parallel statistics / gradient pair of each.
    kernel_names = [*losses, *(f"{loss}_{part}" for loss in losses for part in ("stats", "grad"))]
    # The generic KD divergences' sums and gradient kernels, one compile per divergence.
    kernel_names += [f"{d}_{part}" for d in GENERIC_DIVERGENCES for part in ("sums", "grad")]
    expected = {
        (p.name, {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], kernel, target)
        for p in problems
        for dtype in p.dtypes
        for kernel in kernel_names
        for target in ("sm_80", "sm_90")
    }
    assert {(r["problem"], r["dtype"], r["kernel"], r["target"]) for r in report} == expected
    assert ("gpt2", "fp32", "ce_kl_div", "sm_90") in expected
    for r in report:
        assert r["cubin_bytes"] > 0 and r["ptx_bytes"] > 0
        assert f"sm_{r['capability']}" == r["target"]
        assert 0 < r["registers"] <= r["max_registers"]


def test_no_kernel_spills_or_overflows_its_target(report):
    unfit = [
        f"{r['kernel']} {r['problem']} {r['dtype']} {r['target']}: {r['violations']}"
        for r in report
        if r["violations"] or r["spill_store_bytes"] or r["spill_load_bytes"]
    ]
    assert not unfit


def test_the_old_16k_block_is_reported_as_spilling():
    """The check has teeth: CE + KD at 16K-blocks over 1024 threads spills on sm_90."""
    n, vocab = 256, 50257
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device="meta")
    rows = torch.empty(n, device="meta")
    launch = triton_ops.kl_div_launch(
        logits, logits, torch.empty(n, dtype=torch.long, device="meta"), rows, rows, rows, 2.0, 2.5
    )
    old = triton_ops.Launch(launch.kernel, launch.grid, {**launch.args, "BLOCK": 16384}, 32)
    compiled = compile_launch(old, 90)
    assert compiled.spills and compiled.spill_load_bytes > 0
    assert any("spills" in v for v in violations(compiled))


def test_roofline_counts_every_pass_over_the_row(report):
    by = {(r["problem"], r["dtype"], r["kernel"], r["target"]): r for r in report}
    ce = by["gpt2", "bf16", "cross_entropy", "sm_90"]
    assert ce["bytes_per_row"] == 3 * 50257 * 2 + 16  # two reads and one write of the row
    assert ce["us_per_row"] == pytest.approx(1e6 * ce["bytes_per_row"] / H100_BANDWIDTH)
    assert ce["chunk_rows"] == 256
    assert ce["us_per_chunk"] == pytest.approx(256 * ce["us_per_row"])
    ce_kd = by["gpt2", "fp32", "ce_kl_div", "sm_80"]
    assert ce_kd["bytes_per_row"] == 5 * 50257 * 4 + 20  # student and teacher, gradient written
    assert ce_kd["intensity"] < 10  # memory bound by far at 295 FLOP/B
