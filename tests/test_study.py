"""The study's aggregation (mean, std, paired differences), resume-skip, and missing-method rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ted_scale.config import ConfigError
from ted_scale.io import atomic_write_json
from ted_scale.study.aggregate import (
    metric_by_seed,
    paired_difference,
    summarize,
    t_quantile_975,
)
from ted_scale.study.config import StudyConfig, SweepPoint, load_study_config
from ted_scale.study.plan import DONE_FILE, StudyPaths, is_done, rows, student_config
from ted_scale.study.results import write_report
from ted_scale.study.runner import Job, StudyError, execute, phase_flops, phase_kinds, plan_jobs

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN = "not_a_method"  # stays unknown to the trainer whatever methods it gains


def _study(tmp_path, methods=("kd", "ted", UNKNOWN), seeds=(1, 2, 3)) -> StudyConfig:
    return StudyConfig(
        output_dir=str(tmp_path / "study"),
        seeds=list(seeds),
        student={"student": {"n_layer": 2}, "stage2": {"max_steps": 5}},
        methods=list(methods),
        sweep=[SweepPoint("ted a=0.3", overrides={"distill.alpha_layer": 0.3})],
    )


def test_summarize_gives_mean_and_sample_std():
    assert summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarize([4.0]) == {"mean": 4.0, "std": None, "n": 1}
    assert summarize([]) == {"mean": None, "std": None, "n": 0}


def test_paired_difference_uses_common_seeds_only():
    row = {1: 10.0, 2: 12.0, 3: 11.0, 4: 99.0}
    ted = {1: 9.0, 2: 10.0, 3: 10.0}
    d = paired_difference(row, ted)
    assert d["seeds"] == [1, 2, 3] and d["n"] == 3
    assert d["mean"] == pytest.approx(4 / 3)
    assert d["std"] == pytest.approx(math.sqrt(((1 - 4 / 3) ** 2 * 2 + (2 - 4 / 3) ** 2) / 2))
    # Paired spread is far below the rows' own spread when seeds move both rows together.
    assert d["std"] < summarize([10.0, 12.0, 11.0])["std"]


def test_the_paired_interval_is_the_student_t_interval_computed_by_hand():
    # Differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, t(0.975, 2) = 4.3027 (a t table), so
    # the interval is 0.2 -+ 4.3027 * 0.1 / sqrt(3) = 0.2 -+ 0.24841 = [-0.04841, 0.44841].
    d = paired_difference({1: 10.1, 2: 10.3, 3: 10.2}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert d["ci95"] == pytest.approx([-0.04841, 0.44841], abs=1e-5)
    assert d["distinguishable"] is False  # the interval contains 0
    d = paired_difference({1: 11.1, 2: 11.3, 3: 11.2}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert d["ci95"] == pytest.approx([0.95159, 1.44841], abs=1e-5)
    assert d["distinguishable"] is True
    one = paired_difference({1: 11.0}, {1: 10.0})
    assert one["ci95"] is None and one["distinguishable"] is None
    # Table values and, beyond the table, the expansion (t tables: 2.0395, 2.0211, 1.9799).
    assert [t_quantile_975(df) for df in (1, 2, 4, 30)] == [12.7062, 4.3027, 2.7764, 2.0423]
    assert [t_quantile_975(df) for df in (31, 40, 120)] == pytest.approx(
        [2.0395, 2.0211, 1.9799], abs=1e-4
    )
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def _seeded_build(seed: int, method: str, *overrides: str) -> list:
    """The trainer's seeding, then a method's trained modules built as the trainer builds them:
    their initial weights, and one training-mode forward of the student (its dropout masks)."""
    import torch

    from ted_scale.distill.methods import MethodContext, get_method, load_run_config
    from ted_scale.model import GPT, GPTConfig
    from ted_scale.train.trainer import seed_everything

    config = load_run_config(ROOT / "configs" / f"tiny-{method.replace('_', '-')}.yaml", overrides)
    seed_everything(seed)
    shape = GPTConfig(64, n_positions=16, n_embd=32, n_layer=2, n_head=4, dropout=0.1)
    teacher, student = GPT(shape).eval(), GPT(shape).train()
    ctx = MethodContext(
        config=config, teacher=teacher, student=student, layer_map=[0, 1],
        device=torch.device("cpu"), compute_dtype=None, run_dir=ROOT, log=lambda _: None,
    )  # fmt: skip
    phase = get_method(method).build(get_method(method).plan(config)[0].name, ctx)
    own = [p.detach().clone() for n, p in phase.trained.named_parameters() if "student." not in n]
    ids = torch.arange(24).view(2, 12)
    return [*own, student(ids).logits.detach()]


@pytest.mark.parametrize(
    "method, overrides",
    [("lwd", ()), ("cr_ild", ("cr_ild.objects=hidden", "cr_ild.hidden_fit=linear"))],
)
def test_a_seed_changes_the_random_inits_and_the_dropout_masks(tmp_path, method, overrides):
    study = load_study_config(ROOT / "configs" / "study-cpu.yaml", [f"output_dir={tmp_path}"])
    row = next(r for r in rows(study) if r.method == method)
    raws = [student_config(study, StudyPaths(tmp_path), row, s) for s in study.seeds[:2]]
    assert [r["seed"] for r in raws] == study.seeds[:2]
    assert {r["student"]["dropout"] for r in raws} == {0.1}  # the paper's GPT-2 dropout
    first, again, second = (_seeded_build(s, method, *overrides) for s in (1, 1, 2))
    assert len(first) >= 3  # projections / the fit layer, and the logits
    assert all(a.equal(b) for a, b in zip(first, again, strict=True))  # a seed reproduces
    assert not any(a.equal(b) for a, b in zip(first, second, strict=True))  # another one differs


def test_metric_by_seed_skips_missing_and_non_finite_values():
    runs = {
        1: {"eval": {"heldout": {"perplexity": 5.0}}},
        2: {"eval": {"heldout": {"perplexity": float("inf")}}},
        3: {"eval": {}},
    }
    assert metric_by_seed(runs, ("heldout", "perplexity")) == {1: 5.0}


def test_unknown_method_is_a_missing_row_not_a_job(tmp_path):
    jobs, missing = plan_jobs(_study(tmp_path), StudyPaths(tmp_path / "study"))
    assert set(missing) == {UNKNOWN} and "method" in missing[UNKNOWN]
    assert {j.row.name for j in jobs} == {"alone", "kd", "ted", "ted a=0.3"}
    assert len(jobs) == 4 * 3  # every other row, every seed
    assert rows(_study(tmp_path))[0].name == "alone"


def test_shipped_study_config_plans_every_row(tmp_path):
    """configs/study-cpu.yaml: >= 3 seeds, every run config accepted by the trainer's loader."""
    study = load_study_config(ROOT / "configs" / "study-cpu.yaml", [f"output_dir={tmp_path}"])
    jobs, missing = plan_jobs(study, StudyPaths(tmp_path))
    assert len(study.seeds) >= 3 and {"kd", "lwd", "ted", "ted_kl"} <= set(study.methods)
    planned = {j.row.name for j in jobs}
    assert planned | set(missing) == {r.name for r in rows(study)}
    assert len(jobs) == len(planned) * len(study.seeds)
    sweep = [p.overrides for p in study.sweep]
    assert len({o["distill.alpha_layer"] for o in sweep if "distill.alpha_layer" in o} | {0.1}) >= 3
    assert {"filters.arch": "mlp"} in sweep


def test_bad_study_keys_are_refused_by_the_trainers_loader(tmp_path):
    study = _study(tmp_path)
    study.student["distill"] = {"alpha_layr": 0.1}
    with pytest.raises(ConfigError, match="alpha_layr"):
        plan_jobs(study, StudyPaths(tmp_path / "study"))


def test_finished_runs_are_skipped(tmp_path):
    study = _study(tmp_path, methods=("ted",), seeds=(1, 2))
    paths = StudyPaths(tmp_path / "study")
    plan_jobs(study, paths)  # records each run's fingerprint before it starts
    done = paths.run_dir("ted", 2)
    done.mkdir(parents=True)
    atomic_write_json(done / DONE_FILE, {"eval": {}})
    jobs, _ = plan_jobs(study, paths)
    names = [j.run_dir.name for j in jobs]
    assert is_done(done) and done.name not in names
    assert names == ["alone-s1", "alone-s2", "ted-s1", "ted_a_0.3-s1", "ted_a_0.3-s2"]


def test_flops_count_every_phase_before_stage_ii_as_stage_i(tmp_path):
    """CR-ILD's ILD phase and MiniDisc's sandwich are training before Stage II: FLOPs columns
    take them from the method's plan, not from a list of TED's phase names."""
    paths = StudyPaths(tmp_path / "study")
    jobs, _ = plan_jobs(_study(tmp_path, methods=("cr_ild", "minidisc", "ted")), paths)
    kinds = {j.row.name: phase_kinds(j.config_path) for j in jobs if j.seed == 1}
    assert kinds["cr_ild"] == {"ild": "filters", "stage2": "distill"}
    assert kinds["minidisc"]["sandwich"] == "filters"
    assert kinds["minidisc"]["final_stage2"] == "distill"
    assert kinds["alone"] == {"lm": "distill"}
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"stage": "ild", "step": 5, "tokens_per_s": 100.0, "tflops_per_device": 1e-10},
        {"stage": "ild", "step": 10, "tokens_per_s": 100.0, "tflops_per_device": 1e-10},
        {"stage": "stage2", "step": 20, "tokens_per_s": 50.0, "tflops_per_device": 1e-10},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flops = phase_flops(run, 64, kinds["cr_ild"])
    assert flops["stage1"] == pytest.approx(1e2 / 100.0 * 10 * 64)  # FLOPs/token x tokens
    assert flops["stage2"] == pytest.approx(1e2 / 50.0 * 20 * 64)
    assert phase_flops(run, 64, kinds["alone"]) == {"stage1": None, "stage2": None}


def test_execute_runs_each_job_once_and_collects_failures(tmp_path):
    jobs = [Job(r, s, tmp_path / f"{r}-s{s}", tmp_path / "c.yaml") for r in "ab" for s in (1, 2)]
    seen = []

    def work(job: Job) -> None:
        seen.append(job.run_dir.name)
        if job.run_dir.name == "b-s2":
            raise StudyError("boom")

    failures = execute(jobs, 2, work)
    assert sorted(seen) == ["a-s1", "a-s2", "b-s1", "b-s2"]
    assert failures == {"b-s2": "boom"}


def _fake_done(path, heldout: float, wikitext: float, stage1: float | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = {
        "eval": {
            "heldout": {"perplexity": heldout},
            "wikitext": {
                "token_perplexity": wikitext,
                "word_perplexity": 3 * wikitext,
                "protocol": "lm-eval",
                "source": "wikitext-2-v1 (bundled)",
            },
        },
        "flops": {"stage1": stage1, "stage2": 1e12},
    }
    atomic_write_json(path / DONE_FILE, result)


def test_report_has_mean_std_paired_rows_and_the_missing_method(tmp_path):
    study = _study(tmp_path, seeds=(1, 2, 3))
    paths = StudyPaths(tmp_path / "study")
    _fake_done(paths.teacher, 20.0, 100.0)
    (paths.teacher / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {"step": s, "stage": "lm", "loss": 5 - s / 100, "eval_heldout_ppl": 40 - s / 10}
            )
            + "\n"
            for s in range(10, 60, 10)
        )
    )
    for seed, (kd, ted) in zip((1, 2, 3), ((31.0, 30.0), (33.0, 31.0), (32.0, 31.0)), strict=True):
        _fake_done(paths.run_dir("kd", seed), kd, 200.0)
        _fake_done(paths.run_dir("ted", seed), ted, 190.0, stage1=2e11)
        _fake_done(paths.run_dir("alone", seed), 35.0 + seed, 210.0)
    outcome = {
        "missing": {UNKNOWN: "method must be one of ..."},
        "failures": {},
        "lambada": "LAMBADA left out: test.",
        "lambada_included": False,
    }
    md = write_report(study, outcome, 1.0).read_text()
    results = json.loads((paths.root / "results.json").read_text())
    by_name = {r["name"]: r for r in results["rows"]}
    assert by_name["kd"]["heldout_ppl"]["mean"] == pytest.approx(32.0)
    assert by_name["kd"]["heldout_ppl"]["std"] == pytest.approx(1.0)
    assert by_name["kd"]["paired_vs_ted"]["heldout_ppl"]["mean"] == pytest.approx(4 / 3)
    assert by_name["ted"]["flops"]["total"] == pytest.approx(1.2e12)
    assert by_name[UNKNOWN]["status"] == "not yet implemented"
    assert f"| {UNKNOWN} | not yet implemented |" in md
    assert "| kd | 3 | 32.00 ± 1.00 |" in md
    # Held-out differences 1, 2, 1: mean 4/3, std 0.577, 4/3 -+ 4.3027 * 0.577 / sqrt(3): spans 0.
    assert (
        "| kd | +1.33 [-0.10, +2.77] (3): not distinguishable | +10.00 [+10.00, +10.00] (3) |" in md
    )
    assert by_name["kd"]["paired_vs_ted"]["heldout_ppl"]["distinguishable"] is False
    assert "| alone | +6.33 [+4.90, +7.77] (3) |" in md
    assert "| ted a=0.3 | 0 |" in md  # a sweep row with no finished run yet still shows
    assert "Teacher better than every student row on held-out perplexity: yes." in md
    assert "protocol lm-eval, source wikitext-2-v1 (bundled)" in md
    assert (paths.figures / "teacher_curve.png").is_file()
