"""The throughput benchmark's core on the micro preset: every configuration measured for real."""

import json

import pytest
import torch
from ranks import run_ranks

from ted_scale.bench.ceiling import (
    Ceiling,
    GemmShape,
    best_ceiling,
    measure_ceiling,
    step_shapes,
)
from ted_scale.bench.presets import PRESETS, Spec
from ted_scale.bench.throughput import PIECES
from ted_scale.bench.throughput_suite import (
    configurations,
    format_table,
    run_configuration,
    run_suite,
    targets,
)
from ted_scale.cli.bench_throughput import main as bench_main
from ted_scale.distill.methods import method_names
from ted_scale.flops import TRAINED
from ted_scale.model.gpt import GPTConfig


@pytest.fixture(scope="module")
def micro_result() -> dict:
    specs = configurations(method_names(), [True, False], [True, False], ["sdpa"], cuda=False)
    # In-process for speed (the launch script isolates each configuration in its own process);
    # one thread: tiny ops gain nothing from more, and they stall on a busy shared machine.
    result = run_suite("micro", specs, isolate=False, threads=1, log=lambda _: None)
    return json.loads(json.dumps(result))  # what --out writes must survive JSON


def test_configurations_dedupe_prefetch_without_cuda():
    specs = configurations(["lm", "ted"], [True], [True, False], ["sdpa", "eager"], cuda=False)
    names = [s.name for s in specs]
    assert names == [
        "lm/fused/sdpa", "lm/fused/eager", "ted/fused/sdpa", "ted/fused/eager",
        "reference/sdpa", "reference/eager",
    ]  # fmt: skip
    on_gpu = configurations(["lm", "ted"], [True], [True, False], ["sdpa"], cuda=True)
    assert [s.name for s in on_gpu] == [
        "lm/fused/sdpa", "ted/fused/prefetch/sdpa", "ted/fused/sdpa", "reference/sdpa",
    ]  # fmt: skip


def test_every_configuration_is_measured(micro_result):
    rows = {r["name"]: r for r in micro_result["rows"]}
    expected = {f"{m}/{f}/sdpa" for m in method_names() for f in ("fused", "unfused")} | {
        "reference/sdpa"
    }
    assert set(rows) == expected
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["flops_per_token"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None  # no peak for a CPU
        assert set(r["time_split_ms"]) == set(PIECES)
        assert all(v >= 0 for v in r["time_split_ms"].values())
        assert r["time_split_ms"]["student_forward"] > 0 and r["time_split_ms"]["backward"] > 0
        assert r["peak_mib"] is not None
        assert r["vs_reference"]["speed"] > 0
    assert rows["reference/sdpa"]["vs_reference"] == {"speed": 1.0, "memory": 1.0}
    # The teacher only runs for the distillation methods.
    assert (
        rows["ted/fused/sdpa"]["time_split_ms"]["teacher"]
        > rows["lm/fused/sdpa"]["time_split_ms"]["teacher"]
    )


def test_ratios_and_targets(micro_result):
    rows = {r["name"]: r for r in micro_result["rows"]}
    ted, lm = rows["ted/fused/sdpa"], rows["lm/fused/sdpa"]
    vs = ted["vs_student"]
    assert vs["time_ratio"] == pytest.approx(ted["step_ms"] / lm["step_ms"])
    assert vs["flop_ratio"] == pytest.approx(ted["flops_per_token"] / lm["flops_per_token"])
    assert vs["flop_ratio"] > 1.0  # the teacher, its head and the filters come on top
    assert vs["gap"] == pytest.approx(vs["time_ratio"] / vs["flop_ratio"] - 1.0)
    # The reference computes what TED computes.
    assert rows["reference/sdpa"]["flops_per_token"] == ted["flops_per_token"]
    verdicts = micro_result["targets"]
    assert verdicts["ted_vs_reference"]["config"] == "ted/fused/sdpa"
    assert verdicts["ted_vs_reference"]["verdict"] in ("PASS", "MISS")
    assert verdicts["ted_over_lm_vs_flops"]["verdict"] in ("PASS", "MISS")
    assert verdicts["mfu"]["verdict"] == "n/a"
    table = format_table(micro_result)
    assert "reference/sdpa" in table and "ted_vs_reference" in table
    assert verdicts["ted_over_lm_vs_flops"]["why"] in table


@pytest.mark.parametrize(
    "gap, verdict, why",
    [(0.08, "MISS", "at width 32"), (0.03, "PASS", "at width 32"), (-0.09, "PASS", "below")],
)
def test_the_flop_ratio_check_bounds_teds_excess_and_says_why(gap, verdict, why):
    """TED may cost less than its FLOP ratio says (the student's own step has overheads the count
    does not see), never more than 5 % above it."""
    ted = {
        "method": "ted", "impl": "ted_scale", "fused": True, "prefetch": False,
        "name": "ted/fused/sdpa", "mfu": None, "device": "cpu",
        "vs_student": {"time_ratio": 1.3 * (1 + gap), "flop_ratio": 1.3, "gap": gap},
    }  # fmt: skip
    check = targets([ted], PRESETS["micro"])["ted_over_lm_vs_flops"]
    assert check["verdict"] == verdict and why in check["why"]


def test_cpu_mfu_is_achieved_flops_over_the_measured_ceiling(micro_result):
    ceiling = micro_result["cpu_ceiling"]
    assert ceiling["threads"] == 1 and ceiling["gflops"] > 0
    # Measured before and after the configurations; per shape the faster counts.
    assert ceiling["gflops"] >= max(ceiling["start_gflops"], ceiling["end_gflops"]) * (1 - 1e-9)
    assert {s["name"] for s in ceiling["shapes"]} >= {"lm head", "lm head grad weight", "qkv"}
    for r in micro_result["rows"]:
        assert r["cpu_mfu"] == pytest.approx(r["tflops"] * 1e12 / (ceiling["gflops"] * 1e9))
    table = format_table(micro_result)
    assert "CPU MFU" in table and f"{micro_result['rows'][0]['cpu_mfu']:.1%}" in table


def test_step_shapes_count_every_matmul_of_the_step():
    n, d, vocab, student, teacher = 64, 32, 100, 2, 4
    shapes = step_shapes(n, GPTConfig(vocab_size=vocab, n_embd=d, n_head=4), student, teacher)
    flops = {s.name: s.flops * s.count for s in shapes}
    # LM head: student and teacher forward, the student's two backward products.
    assert flops["lm head"] == 2 * (2 * n * d * vocab)
    assert flops["lm head grad input"] == flops["lm head grad weight"] == 2 * n * d * vocab
    # Blocks: 12 d^2 weights per layer, forward in both models, backward (x2) in the student.
    total = sum(flops.values())
    assert total == 2 * n * (12 * d * d) * (teacher + 3 * student) + 4 * (2 * n * d * vocab)
    # At GPT-2's vocabulary the LM head's products come in the fused loss's 256-row chunks.
    by_name = {s.name: s for s in step_shapes(512, PRESETS["cpu"].arch(), 2, 4)}
    head = by_name["lm head"]
    assert (head.m, head.k, head.n, head.count) == (256, 256, 50257, 4)
    weight_grad = by_name["lm head grad weight"]
    assert (weight_grad.m, weight_grad.k, weight_grad.n, weight_grad.count) == (50257, 256, 256, 2)


def test_step_shapes_of_the_llama_family_have_swiglu_and_grouped_query_attention():
    n, d, q, kv, ffn, vocab, student, teacher = 64, 32, 32, 16, 96, 128, 2, 4
    arch = PRESETS["micro-llama"].arch()  # 4 query heads of 8 per 2 key/value heads
    shapes = step_shapes(n, arch, student, teacher)
    by_shape = {(s.m, s.k, s.n): (s.name, s.count) for s in shapes}
    assert by_shape[(n, d, q + 2 * kv)] == ("qkv", student + teacher)
    # Gate and up forward, and down's grad input: [N, d] x [d, ffn] three times a block.
    assert by_shape[(n, d, ffn)] == ("mlp gate, up", 2 * (student + teacher) + student)
    weights = d * (q + 2 * kv) + q * d + 3 * d * ffn
    total = sum(s.flops * s.count for s in shapes)
    assert total == 2 * n * weights * (teacher + 3 * student) + 4 * (2 * n * d * vocab)


def test_ceiling_weights_each_shape_by_its_flops():
    shapes = [GemmShape(64, 64, 64, count=10, name="small"), GemmShape(256, 512, 384, name="big")]
    ceiling = measure_ceiling(shapes, seconds_per_shape=0.01)
    assert ceiling.threads == torch.get_num_threads()
    assert [(r["name"], r["m"], r["k"], r["n"]) for r in ceiling.shapes] == [
        ("small", 64, 64, 64), ("big", 256, 512, 384),
    ]  # fmt: skip
    weights = [s.flops * s.count for s in shapes]
    rates = [r["gflops"] * 1e9 for r in ceiling.shapes]
    expected = sum(weights) / sum(w / r for w, r in zip(weights, rates, strict=True))
    assert ceiling.gflops * 1e9 == pytest.approx(expected)
    assert min(rates) <= ceiling.gflops * 1e9 <= max(rates)
    with pytest.raises(ValueError, match="at least one shape"):
        measure_ceiling([])


def test_best_ceiling_takes_the_faster_measurement_per_shape():
    def shape(name, m, rate):
        return {"name": name, "m": m, "k": 8, "n": 8, "count": 1, "gflops": rate}

    start = Ceiling(1, 0.0, [shape("a", 8, 10.0), shape("b", 24, 40.0)])
    end = Ceiling(1, 0.0, [shape("a", 8, 20.0), shape("b", 24, 30.0)])
    best = best_ceiling(start, end)
    assert [s["gflops"] for s in best.shapes] == [20.0, 40.0]
    # FLOP-weighted: 1 unit of work at 20 and 3 units at 40 take 1/20 + 3/40 = 1/8 per 4 units.
    assert best.gflops == pytest.approx(32.0)
    with pytest.raises(ValueError, match="same shapes"):
        best_ceiling(start, Ceiling(1, 0.0, [shape("a", 8, 1.0)]))


def test_isolated_worker_process():
    row = run_configuration("micro", Spec("kd", True, False, "sdpa"), isolate=True, threads=1)
    assert row["name"] == "kd/fused/sdpa" and row["tokens_per_s"] > 0 and row["torch_threads"] == 1
    assert row["peak_mib"] > 0  # weights, grads and optimizer state are built after the reset


@pytest.mark.cuda
def test_prefetch_configuration_on_cuda():
    row = run_configuration("micro", Spec("ted", True, True, "auto"), isolate=True)
    assert row["prefetch"] and row["tokens_per_s"] > 0 and row["dtype"] == "bf16"


def test_engine_mode_runs_the_trainers_loop_beside_the_plain_step():
    row = run_configuration(
        "micro", Spec("kd", True, False, "sdpa"), isolate=False, threads=1, engine=True
    )
    assert row["engine_tokens_per_s"] > 0 and len(row["engine_tokens_per_s_all"]) >= 1
    assert row["engine_vs_plain"] == pytest.approx(row["engine_tokens_per_s"] / row["tokens_per_s"])
    table = format_table({**_one_row_result(row)})
    assert "trainer loop (--engine)" in table


def _bench_at_dp2() -> None:
    from ted_scale.bench.data_parallel import format_dp_table, run_dp_suite

    preset = PRESETS["micro"]
    rows = run_dp_suite(preset, ["lm"], 2, engine=True, zero_stage=None)
    if rows is None:  # not rank 0
        return
    (row,) = rows
    assert row["name"] == "lm/fused/auto/dp2" and 0 < row["grad_sync_ms"] < row["step_ms"]
    # Both ranks' micro-batches count, in the plain step as in the trainer's metrics.
    assert row["tokens_per_s"] == pytest.approx(
        2 * preset.micro_batch * preset.seq_len / row["step_ms"] * 1000
    )
    assert row["engine_tokens_per_s"] > 0 and row["zero_stage"] == 1  # the default over 2 ranks
    assert row["engine_vs_plain"] == pytest.approx(row["engine_tokens_per_s"] / row["tokens_per_s"])
    assert "| lm/fused/auto/dp2 |" in format_dp_table(rows)


def test_the_benchmark_at_dp2_times_the_gradient_average_and_the_trainers_loop():
    """``--dp 2 --engine``: the plain step over two ranks beside the trainer over the same two."""
    run_ranks(_bench_at_dp2, 2)


def test_zero_stage_without_data_parallel_engine_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--zero-stage", "0", "--preset", "micro"])
    assert exit_.value.code == 2 and "--dp N --engine" in capsys.readouterr().err


def _one_row_result(row: dict) -> dict:
    return {"preset": "micro", "device": "cpu", "torch_threads": 1, "rows": [row], "targets": {}}


def test_compile_switch_names_its_configurations():
    specs = configurations(["lm"], [True], [False], ["sdpa"], cuda=False, compile=[True, False])
    assert [s.name for s in specs] == ["lm/fused/compiled/sdpa", "lm/fused/sdpa", "reference/sdpa"]


@pytest.fixture(scope="module")
def micro_llama_result() -> dict:
    specs = configurations(["lm", "ted"], [True], [False], ["sdpa"], cuda=False)
    result = run_suite("micro-llama", specs, isolate=False, threads=1, log=lambda _: None)
    return json.loads(json.dumps(result))


def test_the_llama_preset_is_timed_against_transformers_llama(micro_llama_result):
    config = micro_llama_result["config"]
    assert (config["family"], config["kv_heads"], config["ffn"], config["tied_head"]) == (
        "llama", 2, 96, False,
    )  # fmt: skip
    rows = {r["name"]: r for r in micro_llama_result["rows"]}
    assert set(rows) == {"lm/fused/sdpa", "ted/fused/sdpa", "reference/sdpa"}
    assert rows["reference/sdpa"]["hf_class"] == "LlamaForCausalLM"
    # The student alone, counted by hand: per block q/k/v (4 query heads of 8, 2 key/value
    # heads), the output, SwiGLU's three matrices and attention over T = 16; the untied head.
    d, q, kv, ffn, T, V = 32, 32, 16, 96, 16, 128
    block = 2 * d * (q + 2 * kv) + 2 * q * d + 3 * 2 * d * ffn + 4 * T * q
    assert rows["lm/fused/sdpa"]["flops_per_token"] == TRAINED * (2 * block + 2 * V * d)
    ted, reference = rows["ted/fused/sdpa"], rows["reference/sdpa"]
    assert reference["flops_per_token"] == ted["flops_per_token"]
    assert ted["vs_reference"]["speed"] > 0 and ted["vs_reference"]["memory"] > 0
    assert ted["vs_student"]["flop_ratio"] > 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["cpu_mfu"] > 0 and set(r["time_split_ms"]) == set(PIECES)
    assert "mlp gate, up" in {s["name"] for s in micro_llama_result["cpu_ceiling"]["shapes"]}
    table = format_table(micro_llama_result)
    assert table.startswith(
        "preset micro-llama on cpu (1 torch threads); reference: LlamaForCausalLM;"
    )
    assert "ted/fused/sdpa" in table and "ted_vs_reference" in table
