"""The trainer, single process (DeepSpeed on one CPU rank): stages, frozen parts, resume, export,
errors. Multi-rank runs are in test_trainer_distributed.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ted_scale.distill.filter_io import FilterMismatchError
from ted_scale.distill.methods import load_run_config
from ted_scale.model import ModelMismatchError
from ted_scale.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _config(name: str, data: Path, out: Path, *overrides: str):
    return load_run_config(
        REPO / "configs" / name, [f"data.path={data}", f"output_dir={out}", *overrides]
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_trains_only_filters_and_stage2_leaves_teacher_and_its_filters_untouched(
    tiny_data, tmp_path
):
    run = tmp_path / "run"
    stage1 = Trainer(_config("tiny-ted.yaml", tiny_data, run, "stage=filters"))
    teacher0, student0 = _state(stage1.teacher), _state(stage1.student)
    stage1.run()
    assert _same(_state(stage1.teacher), teacher0), "Stage I changed the teacher"
    assert _same(_state(stage1.student), student0), "Stage I changed the student"
    filters = load_file(run / "filters" / "teacher.safetensors")
    # Linear filters start as the identity: training must have moved them.
    assert not torch.equal(filters["filters.0.proj.weight"], torch.eye(64))
    record = json.loads((run / "filters" / "filters.json").read_text())
    assert record["layer_map"] == [0, 3] and record["arch"] == "linear"
    losses = [r for r in _metrics(run) if r["stage"] == "stage1_teacher"]
    assert {"loss_filter_0", "loss_filter_1"} <= losses[0].keys()

    stage2 = Trainer(_config("tiny-ted.yaml", tiny_data, run, "stage=distill"))
    teacher1 = _state(stage2.teacher)
    assert _same(teacher1, teacher0)
    student_before = _state(stage2.student)
    stage2.run()
    assert _same(_state(stage2.teacher), teacher0), "Stage II changed the teacher"
    after = load_file(run / "filters" / "teacher.safetensors")
    assert _same(after, filters), "Stage II changed the saved teacher filters"
    assert not _same(_state(stage2.student), student_before), "Stage II did not train the student"
    records = [r for r in _metrics(run) if r["stage"] == "stage2"]
    for key in (
        "step",
        "loss",
        "lr",
        "tokens_per_s",
        "loss_ce",
        "loss_kd",
        "loss_layer",
        "loss_layer_0",
    ):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    assert (run / "config.yaml").is_file()


def test_exported_student_loads_with_auto_model_and_gives_the_students_logits(tiny_data, tmp_path):
    trainer = Trainer(_config("tiny-kd.yaml", tiny_data, tmp_path / "run", "stage2.max_steps=2"))
    trainer.run()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_hf").eval()
    student = trainer.student.eval()
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        diff = (hf(ids).logits - student(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert (tmp_path / "run" / "student_hf" / "tokenizer.json").is_file()


def test_teacher_prefetch_lookahead_gives_the_same_losses_as_the_sequential_path(
    tiny_data, tmp_path
):
    losses = {}
    for prefetch in ("off", "on"):
        run = tmp_path / prefetch
        Trainer(
            _config(
                "tiny-lwd.yaml",
                tiny_data,
                run,
                f"teacher_prefetch={prefetch}",
                "log.interval=1",
                "stage2.max_steps=6",
            )
        ).run()
        losses[prefetch] = [(r["step"], r["loss"], r["loss_layer"]) for r in _metrics(run)]
    assert losses["on"] == losses["off"]


def test_vocabulary_mismatch_is_refused_before_training(tiny_data, tmp_path):
    config = _config("tiny-kd.yaml", tiny_data, tmp_path / "run", "teacher.arch.vocab_size=500")
    with pytest.raises(ModelMismatchError, match=r"vocabulary of 500 tokens.*512"):
        Trainer(config)


def test_layer_map_past_the_teacher_depth_is_refused(tiny_data, tmp_path):
    config = _config("tiny-kd.yaml", tiny_data, tmp_path / "run", "student.layer_map=[0,4]")
    with pytest.raises(ModelMismatchError, match=r"teacher blocks \[4\].*0\.\.3"):
        Trainer(config)


def test_filters_made_for_another_teacher_are_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    Trainer(_config("tiny-ted.yaml", tiny_data, run, "stage=filters", "stage1.max_steps=1")).run()
    other = _config(
        "tiny-ted.yaml",
        tiny_data,
        tmp_path / "other",
        "stage=distill",
        "seed=7",
        f"filters_from={run / 'filters'}",
    )
    with pytest.raises(FilterMismatchError, match="teacher_fingerprint"):
        Trainer(other).run()
    remapped = _config(
        "tiny-ted.yaml",
        tiny_data,
        tmp_path / "remap",
        "stage=distill",
        "student.layer_map=[1,3]",
        f"filters_from={run / 'filters'}",
    )
    with pytest.raises(FilterMismatchError, match=r"layer_map: saved \[0, 3\], this run \[1, 3\]"):
        Trainer(remapped).run()


# A learning rate that drives the loss to inf/nan within a few steps.
DIVERGING = ("optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_ratio=0")


def test_non_finite_loss_stops_with_step_parts_and_last_checkpoint(tiny_data, tmp_path):
    config = _config(
        "tiny-kd.yaml",
        tiny_data,
        tmp_path / "run",
        *DIVERGING,
        "stage2.max_steps=30",
        "checkpoint.interval=1",
    )
    from ted_scale.train.nonfinite import NonFiniteLossError

    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss at step \d+( \(seen at step \d+, whose parts these are\))?: \{.*loss_ce.*last good checkpoint: .*stage2-step",
    ):
        Trainer(config).run()


def test_nonfinite_steps_are_skipped_and_counted_when_allowed(tiny_data, tmp_path):
    config = _config(
        "tiny-kd.yaml",
        tiny_data,
        tmp_path / "run",
        *DIVERGING,
        "stage2.max_steps=8",
        "skip_nonfinite=100",
        "log.interval=1",
    )
    Trainer(config).run()
    assert _metrics(tmp_path / "run")[-1]["skipped_steps"] > 0


def _run_cli(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "pretrain_ted.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_run_resumes_from_its_checkpoint_with_the_uninterrupted_losses(
    tiny_data, tmp_path, subprocess_env, kill_at
):
    """The killed and resumed run also looks the teacher one micro-batch ahead (prefetch on),
    the uninterrupted one does not: the resumed loader must not count the prefetched batch."""
    common = [
        "--config",
        str(REPO / "configs" / "tiny-ted.yaml"),
        f"data.path={tiny_data}",
        "log.interval=1",
        "student.dropout=0.1",
        "stage1.max_steps=4",
        "stage2.max_steps=10",
        "checkpoint.interval=3",
        "checkpoint.keep=10",
    ]
    full = _run_cli(
        subprocess_env, *common, f"output_dir={tmp_path / 'full'}", "teacher_prefetch=off"
    )
    assert full.wait(timeout=300) == 0, full.stdout.read()

    run = tmp_path / "killed"
    kill_at(
        _run_cli(subprocess_env, *common, f"output_dir={run}", "teacher_prefetch=on"),
        run / "checkpoints" / "stage2-step00000003" / "complete",
    )
    resumed = _run_cli(
        subprocess_env, *common, f"output_dir={run}", "resume=auto", "teacher_prefetch=on"
    )
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out

    def losses(path):
        return [(r["stage"], r["step"], r["loss"]) for r in _metrics(path)]

    assert losses(run) == losses(tmp_path / "full")


# Dropout on, an in-training evaluation right after a checkpoint, Stage II checkpointed only at 4.
WITH_DROPOUT = [
    "--config", str(REPO / "configs" / "tiny-ted.yaml"), "student.dropout=0.1",
    "stage1.max_steps=3", "stage2.max_steps=8", "checkpoint.interval=4", "checkpoint.keep=10",
    "eval.interval=4", "eval.heldout_batches=2", "eval.lambada_examples=4", "log.interval=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_with_dropout(tiny_data, subprocess_env, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    full = _run_cli(subprocess_env, *WITH_DROPOUT, f"data.path={tiny_data}", f"output_dir={run}")
    assert full.wait(timeout=300) == 0, full.stdout.read()
    return run


@pytest.mark.parametrize(
    "kill_after",
    ["progress.json", "checkpoints/stage2-step00000004/complete"],
    ids=["stage1-done-stage2-not-checkpointed", "checkpoint-then-evaluation"],
)
def test_killed_run_with_dropout_exports_the_uninterrupted_student_bit_for_bit(
    kill_after, uninterrupted_with_dropout, tiny_data, tmp_path, subprocess_env, kill_at
):
    """A phase started again draws what it drew the first time, and an evaluation after a
    checkpoint draws nothing from the training's generators."""
    args = [*WITH_DROPOUT, f"data.path={tiny_data}", f"output_dir={tmp_path}"]
    kill_at(_run_cli(subprocess_env, *args), tmp_path / kill_after)
    resumed = _run_cli(subprocess_env, *args, "resume=auto")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return load_file(run / "student_hf" / "model.safetensors")

    expected, got = weights(uninterrupted_with_dropout), weights(tmp_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_save_interrupted_half_way_leaves_the_previous_checkpoint_loadable(tiny_data, tmp_path):
    run = tmp_path / "run"
    Trainer(
        _config(
            "tiny-kd.yaml",
            tiny_data,
            run,
            "stage2.max_steps=4",
            "checkpoint.interval=2",
            "checkpoint.keep=5",
        )
    ).run()
    ckpts = run / "checkpoints"
    # A save killed half-way: its directory exists, DeepSpeed's files partly written, no marker.
    (ckpts / "stage2-step00000004" / "complete").unlink()
    (ckpts / "stage2-step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    progress = run / "progress.json"
    progress.unlink()  # pretend the run never finished
    trainer = Trainer(
        _config(
            "tiny-kd.yaml",
            tiny_data,
            run,
            "stage2.max_steps=4",
            "checkpoint.interval=2",
            "checkpoint.keep=5",
        )
    )
    assert trainer.checkpoints.latest().name == "stage2-step00000002"
    trainer.run()
    assert (ckpts / "stage2-step00000004" / "complete").exists()


def test_teacher_with_another_tokenizer_than_the_data_is_refused(tiny_data, tmp_path):
    from ted_scale.data.tokenizer import train_bpe_tokenizer
    from ted_scale.model import GPT, GPTConfig, export_hf

    other = train_bpe_tokenizer(
        ["an entirely different corpus " * 50, "with other merges"] * 20, 512
    )
    teacher = GPT(GPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4))
    export_hf(teacher, tmp_path / "teacher", other)
    config = _config(
        "tiny-kd.yaml", tiny_data, tmp_path / "run", f"teacher.pretrained={tmp_path / 'teacher'}"
    )
    with pytest.raises(ModelMismatchError, match="another tokenizer than the data"):
        Trainer(config)


@pytest.mark.parametrize(
    "overrides",
    [
        ("method=ted_kl", "filters.arch=mlp", "filters.student_filters=train"),
        (
            "filters.arch=next_block",
            "filters.student_filters=random",
            "distill.layer_reduction=sum",
        ),
        ("filters.arch=rest_blocks", "deepspeed.zero_stage=0", "fused_loss=false"),
        ("method=ted_kl", "ted_kl.head=student", "filters.init=identity"),
    ],
    ids=[
        "ted_kl-mlp-train",
        "next_block-random-sum",
        "rest_blocks-zero0-unfused",
        "ted_kl-student_head-identity",
    ],
)
def test_every_filter_option_runs_both_stages(tiny_data, tmp_path, overrides):
    run = tmp_path / "run"
    Trainer(
        _config(
            "tiny-ted.yaml",
            tiny_data,
            run,
            "stage1.max_steps=2",
            "stage2.max_steps=2",
            "log.interval=1",
            *overrides,
        )
    ).run()
    stages = {r["stage"] for r in _metrics(run)}
    expected = {"stage1_teacher", "stage2"}
    if "filters.student_filters=train" in overrides:
        expected.add("stage1_student")
        assert (run / "filters" / "student.safetensors").is_file()
    assert stages == expected
    assert (run / "student_hf" / "model.safetensors").is_file()


def test_skipped_steps_without_zero_keep_clipping_working_and_are_never_checkpointed(
    tiny_data, tmp_path
):
    """ZeRO-0 with gradient clipping on: a skipped step must not crash inside DeepSpeed's clipping,
    every skipped step is counted, and no checkpoint is saved from a step whose loss was not
    finite."""
    run = tmp_path / "run"
    config = _config(
        "tiny-kd.yaml",
        tiny_data,
        run,
        "optim.lr=1e30",
        "optim.grad_clip=1.0",
        "optim.warmup_ratio=0",
        "deepspeed.zero_stage=0",
        "stage2.max_steps=8",
        "skip_nonfinite=100",
        "log.interval=1",
        "checkpoint.interval=1",
        "checkpoint.keep=100",
    )
    Trainer(config).run()
    records = _metrics(run)
    bad = [r["step"] for r in records if r["loss"] is None]
    assert bad, "the diverging learning rate produced no non-finite loss"
    assert records[-1]["skipped_steps"] == len(bad)
    saved = {int(p.name.split("step")[1]) for p in (run / "checkpoints").glob("stage2-step*")}
    assert saved and not saved & set(bad), f"checkpoints {sorted(saved)} at bad steps {bad}"


def test_evaluation_inputs_are_checked_before_step_one(tiny_data, tmp_path):
    bad = tmp_path / "lambada.jsonl"
    bad.write_text('{"text": "one two three"}\nnot json\n')
    config = _config(
        "tiny-kd.yaml", tiny_data, tmp_path / "run", "eval.interval=2", f"eval.lambada_path={bad}"
    )
    with pytest.raises(Exception, match=r"lambada\.jsonl:2: expected a JSON object"):
        Trainer(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failing_evaluation_loses_nothing_the_steps_checkpoint_comes_first(
    tiny_data, tmp_path, monkeypatch
):
    from ted_scale.train.evaluation import InTrainingEval

    def failing(self, model, device):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(InTrainingEval, "__call__", failing)
    run = tmp_path / "run"
    config = _config("tiny-kd.yaml", tiny_data, run, "eval.interval=2", "checkpoint.interval=2")
    with pytest.raises(RuntimeError, match="evaluation broke"):
        Trainer(config).run()
    assert (run / "checkpoints" / "stage2-step00000002" / "complete").exists()
