"""MiniDisc (``method: minidisc``): the sandwich loss against a direct computation, one teacher
forward per micro-batch and one optimizer step, the lambda choice, FLOPs of sub-networks, held-out
accuracy, kill -9 and resume in every phase, two ZeRO-2 ranks, and the exported TA and student."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ted_scale.config import ConfigError
from ted_scale.distill.methods import load_run_config
from ted_scale.distill.methods.minidisc import (
    MiniDiscConfig,
    candidate_parameters,
    candidate_sparsities,
    choose_sparsity,
    model_sizes,
    schedule_markdown,
    sorted_importance,
)
from ted_scale.eval.heldout import heldout_perplexity
from ted_scale.flops import forward_flops, subnet_flops
from ted_scale.model import GPT, GPTConfig, Subnet, load_pretrained
from ted_scale.model.pruning import extract, subnet_at

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-minidisc.yaml"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- config and choice
def test_sparsities_are_numbers_sorted_as_numbers_and_lambda_is_a_float():
    config = load_run_config(
        CONFIG, ["minidisc.sparsities=['0.35', 0.1, 0.25, '0.3']", "minidisc.lam=1"]
    )
    assert config.minidisc.sparsities == [0.1, 0.25, 0.3, 0.35]
    assert isinstance(config.minidisc.lam, float) and config.minidisc.lam == 1.0
    for bad in ("1.0", "0.0"):
        with pytest.raises(ConfigError, match=rf"minidisc: sparsities\[1\] = {bad} must be in"):
            load_run_config(CONFIG, [f"minidisc.sparsities=[0.3, {bad}]"])
    with pytest.raises(ConfigError, match=r"did you mean 'minidisc.lam'"):
        load_run_config(CONFIG, ["minidisc.lambda=0.2"])
    with pytest.raises(ConfigError, match=r"minidisc: final_method: method must be one of .*tedd"):
        load_run_config(CONFIG, ["minidisc.final_method=tedd"])
    with pytest.raises(ConfigError, match=r"minidisc: final_method cannot be minidisc itself"):
        load_run_config(CONFIG, ["minidisc.final_method=minidisc"])


STUDY_TEACHER = GPTConfig(vocab_size=4096, n_positions=128, n_embd=128, n_layer=6, n_head=4)
STUDY_STUDENT = dataclasses.replace(STUDY_TEACHER, n_layer=3)  # the teacher's blocks 0, 2, 5


def test_candidates_lie_strictly_between_teacher_and_student():
    """The study's shapes: the 3-of-6-block student lacks half of the teacher's prunable weights;
    the default candidates are spaced evenly below, and one at or beyond it is refused."""
    sizes = model_sizes(STUDY_TEACHER, STUDY_STUDENT)
    assert (sizes.teacher, sizes.student) == (1_714_176, 1_119_360)
    assert sizes.student_sparsity == 0.5
    defaults = candidate_sparsities(MiniDiscConfig(), sizes, STUDY_TEACHER)
    assert defaults == [0.1, 0.2, 0.3, 0.4]
    counts = [candidate_parameters(STUDY_TEACHER, s) for s in defaults]
    assert sizes.teacher > counts[0] > counts[-1] > sizes.student
    assert candidate_sparsities(MiniDiscConfig(candidates=2), sizes, STUDY_TEACHER) == [
        0.167,
        0.333,
    ]
    # 0.5 keeps the student's heads and neurons (more parameters only in LayerNorms and biases).
    with pytest.raises(
        ConfigError,
        match=r"minidisc.sparsities: 0.5 \(1,121,664 parameters\), 0.7 \(881,466 parameters\): "
        r"a TA candidate must lie strictly between the teacher \(1,714,176 parameters\) and the "
        r"student \(1,119,360, 50.0% .*\(0, 0.5\)",
    ):
        candidate_sparsities(MiniDiscConfig(sparsities=[0.3, 0.5, 0.7]), sizes, STUDY_TEACHER)


def test_a_run_refuses_candidates_beyond_its_student_before_any_work(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path, "minidisc.sparsities=[0.25,0.5,0.7]")
    with pytest.raises(ConfigError, match=r"minidisc.sparsities: 0.5 \(.*\), 0.7 \(.*\): a TA"):
        trainer.method.build("importance", trainer.ctx)
    assert not (tmp_path / "run" / "minidisc").exists()


def test_the_choice_is_the_argmax_of_performance_plus_lambda_times_sparsity():
    sparsities = [0.1, 0.2, 0.3, 0.4]
    performances = [0.40, 0.39, 0.385, 0.33]
    choice = choose_sparsity(sparsities, performances, 0.2)
    scores = [p + 0.2 * s for s, p in zip(sparsities, performances, strict=True)]
    assert choice.scores == pytest.approx(scores)
    assert choice.ta == sparsities[max(range(4), key=scores.__getitem__)] == 0.3
    # A tie goes to the larger TA.
    assert choose_sparsity([0.25, 0.5], [0.5, 0.25], 1.0).ta == 0.25


def test_lambda_trades_performance_against_size_on_a_fixed_table():
    """The study's candidates with a fixed table of accuracies: lambda 0 picks the best performer,
    a large lambda the smallest candidate, one between a candidate between; none of them is the
    student's own size (sparsity 0.5), and the report shows every candidate's size and score."""
    sparsities = [0.1, 0.2, 0.3, 0.4]
    accuracies = [0.300, 0.296, 0.290, 0.262]
    assert choose_sparsity(sparsities, accuracies, 0.0).ta == 0.1
    assert choose_sparsity(sparsities, accuracies, 0.1).ta == 0.3
    assert choose_sparsity(sparsities, accuracies, 1.0).ta == 0.4
    sizes = model_sizes(STUDY_TEACHER, STUDY_STUDENT)
    assert sizes.student_sparsity not in sparsities
    rows = [
        {
            "sparsity": s,
            "parameters": candidate_parameters(STUDY_TEACHER, s),
            "accuracy": a,
            "perplexity": 60.0,
            "score": a + 0.1 * s,
        }
        for s, a in zip(sparsities, accuracies, strict=True)
    ]
    report = {
        "lam": 0.1,
        "dev": {"split": "train", "samples": "the last 576", "tokens": 73_728},
        "teacher_parameters": sizes.teacher,
        "student_parameters": sizes.student,
        "student_sparsity": sizes.student_sparsity,
        "candidates": rows,
        "ta": rows[2],
        "ta_by_lambda": {"0": 0.1, "0.1": 0.3, "1": 0.4},
    }
    table = schedule_markdown(report)
    for r in rows:
        assert f"| candidate | {r['sparsity']:g} | {r['parameters']:,} |" in table
        assert f"{r['accuracy']:.4f} | 60.000 | {r['score']:.4f} |" in table
    assert "| candidate | 0.3 | 1,361,862 | 79.4 % | 0.2900 | 60.000 | 0.3200 | **TA** |" in table
    assert "| student | 0.5 | 1,119,360 | 65.3 % |" in table
    assert "0 -> 0.1, 0.1 -> 0.3, 1 -> 0.4" in table


# ---------------------------------------------------------------------------- FLOPs and accuracy
def test_subnet_flops_count_the_active_prefix(tiny_gpt):
    from ted_scale.model.pruning import mask_importance

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 101, (2, 16), generator=g),) * 2]
    importance = mask_importance(tiny_gpt, batches)
    for s in (0.0, 0.5, 0.9):
        subnet = subnet_at(importance, s)
        dense = extract(tiny_gpt, subnet)
        assert subnet_flops(tiny_gpt, subnet, 64) == pytest.approx(forward_flops(dense.blocks, 64))
    assert subnet_flops(tiny_gpt, subnet_at(importance, 0.0), 64) == forward_flops(
        tiny_gpt.blocks, 64
    )


# Llama-shaped (the families' test teacher): GQA 4:2 with head width 16, SwiGLU 128 wide, untied.
LLAMA_TEACHER = GPTConfig(
    family="llama", vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4, n_kv_head=2,
    n_inner=128, qkv_bias=False, out_bias=False, mlp_bias=False, tie_word_embeddings=False,
)  # fmt: skip


def test_family_sizes_count_grouped_kv_swiglu_and_the_untied_head_by_hand():
    C, V, d, inner = 64, 512, 16, 128
    unit = 2 * d * C + 2 * d * C + 2 * d * C  # two query heads, one k and one v head, out columns
    neuron = 3 * C  # gate and up rows, down column
    fixed = 2 * V * C + C + 4 * 2 * C  # embedding, untied head, final norm, two norms per block
    prunable = 4 * (2 * unit + inner * neuron)
    sizes = model_sizes(LLAMA_TEACHER, dataclasses.replace(LLAMA_TEACHER, n_layer=2))
    assert (sizes.teacher, sizes.teacher_prunable) == (fixed + prunable, prunable)
    assert sizes.student == 2 * V * C + C + 2 * 2 * C + 2 * (2 * unit + inner * neuron)
    # 0.25 of the 8 key/value groups and of the 512 neurons go.
    assert candidate_parameters(LLAMA_TEACHER, 0.25) == fixed + prunable - 2 * unit - 128 * neuron


def test_family_subnet_flops_equal_the_extracted_models():
    from ted_scale.model.pruning import mask_importance

    torch.manual_seed(0)
    model = GPT(LLAMA_TEACHER).eval()
    g = torch.Generator().manual_seed(0)
    importance = mask_importance(model, [(torch.randint(0, 512, (2, 16), generator=g),) * 2])
    for s in (0.0, 0.3, 0.6, 0.9):
        subnet = subnet_at(importance, s)
        dense = extract(model, subnet)
        assert subnet_flops(model, subnet, 64) == pytest.approx(forward_flops(dense.blocks, 64))


def test_heldout_accuracy_is_the_fraction_of_greedy_hits(tiny_gpt):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (3, 20), generator=g)
    labels = torch.randint(0, 101, (3, 20), generator=g)
    labels[0, :5] = -100
    logits = tiny_gpt(ids).logits
    keep = labels != -100
    want = (logits.argmax(-1) == labels)[keep].float().mean().item()
    got = heldout_perplexity(tiny_gpt, [(ids, labels)])
    assert got["accuracy"] == pytest.approx(want) and 0.0 <= got["accuracy"] <= 1.0
    assert got["num_correct"] == round(want * int(keep.sum()))


# ---------------------------------------------------------------------------- the sandwich step
def _trainer(tiny_data, tmp_path, *overrides: str):
    from ted_scale.train.trainer import Trainer

    return Trainer(
        load_run_config(
            CONFIG, [f"data.path={tiny_data}", f"output_dir={tmp_path / 'run'}", *overrides]
        )
    )


def _direct_sandwich_loss(
    teacher: GPT, ta: GPT, subnets, ids, labels, temperature, reduce=torch.mean
) -> torch.Tensor:
    """The authors' formula over dense copies of the candidates: per candidate (mean of MSE over
    the embeddings and every second block + T^2 KL of the logits) / 2, mean over candidates."""
    n = teacher.config.n_layer
    blocks = list(range(1, n, 2))
    t_out = teacher(ids, output_layers=blocks)
    t_states = [t_out.embeddings, *(t_out.hidden_states[i] for i in blocks)]
    keep = labels != -100
    total = 0.0
    for subnet in subnets:
        dense = extract(ta, subnet)
        out = dense(ids, output_layers=blocks)
        states = [out.embeddings, *(out.hidden_states[i] for i in blocks)]
        layer = reduce(
            torch.stack([F.mse_loss(s, t) for s, t in zip(states, t_states, strict=True)])
        )
        log_p = F.log_softmax(out.logits[keep] / temperature, -1)
        log_q = F.log_softmax(t_out.logits[keep] / temperature, -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature**2
        total = total + (layer + kl) / 2
    return total / len(subnets)


def test_sandwich_loss_equals_the_formula_over_the_candidates(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path, "minidisc.temperature=2.0")
    method, ctx = trainer.method, trainer.ctx
    method.build("importance", ctx).finish()
    phase = method.build("sandwich", ctx)
    sandwich = phase.trained.eval()
    # The TA starts as the reordered teacher: the same function.
    ids, labels = ctx.batches("train", 1)[0]
    assert torch.allclose(sandwich.student(ids).logits, ctx.teacher(ids).logits, atol=1e-5)
    with torch.no_grad():  # a different TA than the teacher, so the terms are not all zero
        for p in sandwich.student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    loss, parts = sandwich(ids, labels, phase.tapper(ids))
    with torch.no_grad():
        want = _direct_sandwich_loss(
            ctx.teacher, sandwich.student, sandwich.subnets, ids, labels, 2.0
        )
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert len(sandwich.subnets) == 3 and set(parts) >= {"loss_layer", "loss_kd"}
    assert torch.stack([parts[f"loss_candidate_{i}"] for i in range(3)]).mean().item() == (
        pytest.approx(loss.item(), rel=1e-6)
    )
    sandwich.layer_reduction = "sum"  # minidisc.layer_reduction=sum
    with torch.no_grad():
        want = _direct_sandwich_loss(
            ctx.teacher, sandwich.student, sandwich.subnets, ids, labels, 2.0, torch.sum
        )
    assert sandwich(ids, labels, phase.tapper(ids))[0].item() == pytest.approx(want.item(), 1e-5)
    # Exactly the FLOPs of one teacher forward and each candidate's prefix.
    c, seq = ctx.teacher.config, 64
    head = 2 * c.vocab_size * c.n_embd  # one LM head application
    want_flops = forward_flops(ctx.teacher.blocks, seq) + head + 3 * head
    want_flops += 3 * sum(subnet_flops(sandwich.student, s, seq) + head for s in sandwich.subnets)
    assert phase.flops_per_token(seq) == pytest.approx(want_flops)


def test_one_teacher_forward_per_micro_batch_and_one_optimizer_step(
    tiny_data, tmp_path, monkeypatch
):
    import ted_scale.train.engine as engine_module

    optimizers = []
    build_optimizer = engine_module.build_optimizer

    def recorded(*args, **kwargs):
        optimizers.append(build_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(engine_module, "build_optimizer", recorded)
    trainer = _trainer(tiny_data, tmp_path, "minidisc.sandwich.max_steps=3")
    method, ctx = trainer.method, trainer.ctx
    method.build("importance", ctx).finish()
    phase = method.build("sandwich", ctx)
    teacher_calls, ta_calls = [], []
    hooks = [
        ctx.teacher.register_forward_hook(lambda *_: teacher_calls.append(1)),
        phase.trained.student.register_forward_hook(lambda *_: ta_calls.append(1)),
    ]
    try:
        trainer.train_phase(phase, None)
    finally:
        for hook in hooks:
            hook.remove()
    micro_batches = 3 * 2  # 3 steps of 2 accumulation micro-batches
    assert len(teacher_calls) == micro_batches
    assert len(ta_calls) == micro_batches * 3  # every candidate on every micro-batch
    # One AdamW step per optimizer step (DeepSpeed steps the client once per parameter group).
    (optimizer,) = optimizers
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}


def test_parameters_no_candidate_uses_get_an_exactly_zero_gradient(tiny_data, tmp_path):
    """Candidates whose blocks 0 and 2 keep no head (possible for candidates larger than the
    student: pruning ranks heads across blocks). Their attention's input side (ln_1 and
    qkv_proj) still takes part through a zero-width output, so its gradient is exactly zero, not
    missing: every parameter gets one, on one rank as under tensor parallelism, where a rank
    without heads must still join its peers' backward collectives."""
    trainer = _trainer(tiny_data, tmp_path)
    trainer.method.build("importance", trainer.ctx).finish()
    phase = trainer.method.build("sandwich", trainer.ctx)
    phase.trained.subnets = [
        Subnet((0, 4, 0, 4), (256, 200, 256, 100)),
        Subnet((0, 2, 0, 3), (256, 256, 256, 256)),
    ]
    heads = [h for s in phase.trained.subnets for h in s.heads]
    ids, labels = trainer.ctx.batches("train", 1)[0]
    loss, _ = phase.trained(ids, labels, phase.tapper(ids))
    loss.backward()
    grads = dict(phase.trained.named_parameters())
    assert all(p.grad is not None for p in grads.values())
    headless = [
        i for i in range(len(heads) // len(phase.trained.subnets))
        if all(s.heads[i] == 0 for s in phase.trained.subnets)
    ]  # fmt: skip
    assert headless
    for i in headless:
        assert not grads[f"student.blocks.{i}.attn.qkv_proj.weight"].grad.any()
        assert not grads[f"student.blocks.{i}.ln_1.weight"].grad.any()


def test_the_ta_is_chosen_on_development_samples_kept_out_of_its_training(tiny_data, tmp_path):
    """The development split is the training split's last ``minidisc.dev_samples`` (16) samples:
    the importance and the sandwich never read them, the scoring reads only them, and nothing
    reads the split results are reported on (``data.eval_split``)."""
    trainer = _trainer(tiny_data, tmp_path)
    method, ctx = trainer.method, trainer.ctx
    calls, batches = [], ctx.batches

    def recorded(split: str, n: int, samples: slice | None = None):
        calls.append((split, samples))
        return batches(split, n, samples)

    ctx.batches = recorded
    method.build("importance", ctx).finish()
    phase = method.build("sandwich", ctx)
    assert calls == [("train", slice(None, -16))]
    assert phase.train_samples == slice(None, -16)
    full = trainer._open_split("train")
    assert len(trainer._loader("train", phase.train_samples).dataset) == len(full) - 16
    dev = full.subset(slice(-16, None))
    assert len(dev) == 16 and np.array_equal(dev.sample(0), full.sample(len(full) - 16))
    phase.finish()  # the shared TA weights, untrained
    calls.clear()
    method.build("scoring", ctx).finish()
    assert calls == [("train", slice(-16, None))]
    report = json.loads((tmp_path / "run" / "minidisc.json").read_text())
    assert report["dev"] == {"split": "train", "samples": "the last 16", "tokens": 16 * 64}


# ---------------------------------------------------------------------------- runs end to end
COMMON = ["log.interval=1", "checkpoint.interval=3", "checkpoint.keep=10"]
# Every source of randomness on (the candidates train with the teacher's dropout): a killed run
# must still resume to the uninterrupted one's student, bit for bit.
WITH_DROPOUT = ["student.dropout=0.1", "teacher.arch.dropout=0.1"]


def _launch(env, launcher: list[str], out: Path, data: Path, *extra: str) -> subprocess.Popen:
    cmd = [*launcher, str(REPO / "launch" / "pretrain_ted.py"), "--config", str(CONFIG)]
    cmd += [f"data.path={data}", f"output_dir={out}", *COMMON, *extra]
    return subprocess.Popen(
        cmd,
        env={**env, "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory, subprocess_env) -> Path:
    run = tmp_path_factory.mktemp("minidisc") / "full"
    _finish(_launch(subprocess_env, [sys.executable], run, tiny_data, *WITH_DROPOUT))
    return run


def test_a_full_run_writes_the_schedule_and_the_models_load_in_transformers(
    full_run, tiny_data, tmp_path
):
    from transformers import AutoModelForCausalLM

    from ted_scale.train.trainer import Trainer

    stages = [s for s, *_ in _losses(full_run)]
    assert stages == ["sandwich"] * 6 + ["final_stage1_teacher"] * 4 + ["final_stage2"] * 6
    report = json.loads((full_run / "minidisc.json").read_text())
    rows = report["candidates"]
    assert [r["sparsity"] for r in rows] == [0.1, 0.25, 0.4]
    for r in rows:
        assert r["score"] == pytest.approx(r["accuracy"] + 0.2 * r["sparsity"])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["perplexity"] > 1.0
        assert report["teacher_parameters"] > r["parameters"] > report["student_parameters"]
    choice = choose_sparsity([0.1, 0.25, 0.4], [r["accuracy"] for r in rows], 0.2)
    assert report["ta"]["sparsity"] == choice.ta and report["student_sparsity"] == 0.5
    table = (full_run / "minidisc.md").read_text().splitlines()
    assert sum(line.startswith("| candidate |") for line in table) == 3
    # The final hop trains the run's own student: KD's, parameter for parameter.
    kd = load_run_config(
        CONFIG, ["method=kd", f"data.path={tiny_data}", f"output_dir={tmp_path / 'kd'}"]
    )
    student = load_pretrained(full_run / "student_hf")
    assert student.num_params() == Trainer(kd).student.num_params() == report["student_parameters"]
    assert (full_run / "minidisc.png").stat().st_size > 0
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    for folder, layers in (("ta_hf", 4), ("student_hf", 2)):
        hf = AutoModelForCausalLM.from_pretrained(full_run / folder).eval()
        ours = load_pretrained(full_run / folder).eval()
        assert ours.config.n_layer == layers
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)
    ta = load_pretrained(full_run / "ta_hf")
    assert ta.num_params() == report["ta"]["parameters"]
    # The TA is the shared weights' prefix at its sparsity.
    shared = load_pretrained(full_run / "minidisc" / "ta_shared_hf")
    from safetensors.torch import load_file

    from ted_scale.model.pruning import Importance

    saved = load_file(full_run / "minidisc" / "importance.safetensors")
    importance = Importance(
        [saved[f"heads.{i}"] for i in range(4)], [saved[f"neurons.{i}"] for i in range(4)]
    )
    prefix = extract(shared, subnet_at(sorted_importance(importance), report["ta"]["sparsity"]))
    with torch.no_grad():
        assert torch.allclose(prefix.eval()(ids).logits, ta.eval()(ids).logits, atol=1e-5)


def test_kill_in_every_phase_and_resume_continue_exactly(
    full_run, tiny_data, tmp_path, subprocess_env
):
    run = tmp_path / "killed"
    kill_points = [
        ("importance", run / "minidisc" / "importance.safetensors"),
        ("sandwich", run / "checkpoints" / "sandwich-step00000003" / "complete"),
        ("scoring", run / "minidisc.json"),
        ("final_stage1_teacher", run / "checkpoints" / "final_stage1_teacher-step00000003"),
        ("final_stage2", run / "checkpoints" / "final_stage2-step00000003" / "complete"),
    ]
    outputs = []
    for phase, marker in kill_points:
        proc = _launch(
            subprocess_env, [sys.executable], run, tiny_data, *WITH_DROPOUT, "resume=auto"
        )
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        outputs.append(proc.communicate()[0])
        assert marker.exists(), f"the run ended before the {phase} kill point"
    out = _finish(
        _launch(subprocess_env, [sys.executable], run, tiny_data, *WITH_DROPOUT, "resume=auto")
    )
    # The importance written before the first kill was read, never computed again.
    later = "".join(outputs[1:]) + out
    assert "importance of heads and neurons saved" not in later
    assert "final_stage2: resumed from" in out
    assert _losses(run) == _losses(full_run)
    report, full_report = (json.loads((r / "minidisc.json").read_text()) for r in (run, full_run))
    assert report == full_report
    a, b = (load_pretrained(r / "student_hf").state_dict() for r in (run, full_run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("deepspeed", path=str(VENV_BIN)) is None, reason="no deepspeed launcher"
)
def test_two_ranks_with_zero2_reproduce_the_single_process_losses(
    tiny_data, tmp_path, subprocess_env
):
    extra = ("deepspeed.zero_stage=2",)
    single = tmp_path / "single"
    _finish(_launch(subprocess_env, [sys.executable], single, tiny_data, *extra))
    two = tmp_path / "two"
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29537"]
    _finish(_launch(subprocess_env, launcher, two, tiny_data, *extra))
    a, b = _losses(single), _losses(two)
    assert [(s, n) for s, n, _ in a] == [(s, n) for s, n, _ in b]
    assert [s for s, *_ in a].count("sandwich") == 6
    for (_, _, x), (_, _, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4)
    assert json.loads((single / "minidisc.json").read_text())["ta"] == pytest.approx(
        json.loads((two / "minidisc.json").read_text())["ta"]
    )
    assert (two / "student_hf" / "model.safetensors").is_file()
