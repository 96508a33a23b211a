"""What a resume reads cannot run code, is checked against its checksums, and is not shared with a
second run; the config record and metrics survive kills and changed resumes (issue 17)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ted_scale.config import ConfigError
from ted_scale.distill.methods import load_run_config
from ted_scale.train.run_dir import RunFileError
from ted_scale.train.run_lock import RunLockedError
from ted_scale.train.safe_checkpoint import UnsafeCheckpointError, complete_record
from ted_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = ("stage2.max_steps=2", "checkpoint.interval=1", "checkpoint.keep=5", "log.interval=1")


def _config(data: Path, out: Path, *overrides: str):
    return load_run_config(
        REPO / "configs" / "tiny-kd.yaml",
        [f"data.path={data}", f"output_dir={out}", "log.tensorboard=false", *STEPS, *overrides],
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """A 2-step KD run (ZeRO-1) with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    Trainer(_config(tiny_data, run)).run()
    return run


def _copy_to_resume(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run whose stage is not marked done, so the next run resumes it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "progress.json").unlink()
    return run


class _CreatesFile:
    """Unpickling this creates a file: the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused_for_every_file_a_resume_reads(
    finished_run, tiny_data, tmp_path
):
    tag = "stage2-step00000002"
    names = sorted(p.name for p in (finished_run / "checkpoints" / tag).iterdir())
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(names)
    for name in names:
        if name == "complete":
            continue
        case = tmp_path / name
        run = _copy_to_resume(finished_run, case)
        ckpt = run / "checkpoints" / tag
        marker = case / "code_ran"
        torch.save({"state": _CreatesFile(marker)}, ckpt / name)
        # The attacker also rewrites the checksums: only the loader itself can stop this.
        (ckpt / "complete").write_text(complete_record(tag, ckpt))
        with pytest.raises(UnsafeCheckpointError, match=rf"{ckpt / name}: "):
            Trainer(_config(tiny_data, run)).run()
        assert not marker.exists(), f"loading {name} ran code"


def test_a_corrupted_newest_checkpoint_is_named_and_the_run_falls_back_to_the_intact_one(
    finished_run, tiny_data, tmp_path, capsys
):
    run = _copy_to_resume(finished_run, tmp_path)
    newest = run / "checkpoints" / "stage2-step00000002" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, `complete` still in place
    Trainer(_config(tiny_data, run)).run()
    out = capsys.readouterr().out
    assert f"{newest}: checksum mismatch" in out
    assert "resuming from" in out and "stage2-step00000001, the newest intact one" in out
    # Step 2 was recomputed from step 1 and gives the uninterrupted run's numbers.
    again = [(r["step"], r["loss"]) for r in _metrics(run) if "loss" in r]
    assert again == [(r["step"], r["loss"]) for r in _metrics(finished_run) if "loss" in r]


def test_a_second_run_on_a_locked_directory_is_refused_and_a_dead_holders_lock_taken_over(
    tiny_data, tmp_path, lock_holder, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    holder = lock_holder(run)
    with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {holder.pid} on"):
        Trainer(_config(tiny_data, run))
    assert not (run / "config.yaml").exists()
    holder.send_signal(signal.SIGKILL)  # the holder dies without releasing its lock
    holder.wait()
    Trainer(_config(tiny_data, run, "stage2.max_steps=1")).run()
    assert (
        f"took over the lock left in {run / '.lock'} by pid {holder.pid} on host"
        in capsys.readouterr().out
    )
    assert not (run / ".lock").exists()  # released at the end


def test_a_half_written_metrics_line_is_dropped_on_resume(finished_run, tiny_data, tmp_path):
    run = _copy_to_resume(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "stage2-step00000002")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "stage": "stage2", "lo')  # the kill came mid-line
    Trainer(_config(tiny_data, run)).run()
    assert [(r["stage"], r["step"]) for r in _metrics(run)] == [("stage2", 1), ("stage2", 2)]
    assert _metrics(run)[1]["loss"] == _metrics(finished_run)[1]["loss"]


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicated_metrics_lines(
    finished_run, tiny_data, tmp_path
):
    run = _copy_to_resume(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")  # killed after logging steps 1-2, before any checkpoint
    Trainer(_config(tiny_data, run)).run()
    assert [(r["stage"], r["step"]) for r in _metrics(run)] == [("stage2", 1), ("stage2", 2)]


def test_a_resume_keeps_the_original_config_and_names_changed_keys(
    finished_run, tiny_data, tmp_path, capsys
):
    run = _copy_to_resume(finished_run, tmp_path)
    original = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"seed: 1234 -> 7.*restore those values"):
        Trainer(_config(tiny_data, run, "seed=7"))
    assert (run / "config.yaml").read_bytes() == original
    assert not (run / "config.2.yaml").exists()

    Trainer(_config(tiny_data, run, "optim.lr=0.5", "log.interval=2")).run()
    out = capsys.readouterr().out
    assert "warning: optim.lr changed (0.001 -> 0.5) but is ignored by this resume" in out
    assert "log.interval: 1 -> 2" in out
    assert (run / "config.yaml").read_bytes() == original
    assert "lr: 0.5" in (run / "config.2.yaml").read_text()


def test_resume_pointing_into_another_run_is_a_config_error(finished_run, tiny_data, tmp_path):
    other = finished_run / "checkpoints" / "stage2-step00000001"
    with pytest.raises(ConfigError, match=rf"resume='{other}' is not a checkpoint of this run"):
        Trainer(_config(tiny_data, tmp_path / "run", f"resume={other}")).run()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", r"seed must be >= 0, got -1"),
        (
            "deepspeed.extra={train_batch_size: 7}",
            r"deepspeed.extra.train_batch_size=7 contradicts",
        ),
        ("deepspeed.extra={zero_optimization: {bogus: 1}}", r"deepspeed.extra: DeepSpeed rejects"),
        ("deepspeed.extra={bf16: {enabled: true}}", r"deepspeed.extra.bf16.enabled: precision"),
    ],
)
def test_bad_seed_and_deepspeed_extra_are_config_errors_before_any_file_is_written(
    tiny_data, tmp_path, override, message
):
    with pytest.raises(ConfigError, match=message):
        Trainer(_config(tiny_data, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_global_batch_not_divisible_by_micro_batch_times_ranks_is_a_config_error(tiny_data):
    from ted_scale.train.engine import gradient_accumulation_steps

    config = _config(tiny_data, Path("unused"))
    with pytest.raises(
        ConfigError, match=r"multiple of batch.micro_batch_size x data-parallel ranks = 4 x 3"
    ):
        gradient_accumulation_steps(config, dp_size=3)


def test_a_checkpoint_of_another_tensor_parallel_size_is_refused_saying_how_to_go_on(
    finished_run, tmp_path, tiny_data
):
    run = _copy_to_resume(finished_run, tmp_path)
    tag = run / "checkpoints" / "stage2-step00000002"
    layout = {"tensor_parallel_size": 1, "zero_stage": 1}
    assert json.loads((tag / "layout.json").read_text()) == layout
    (tag / "layout.json").write_text(json.dumps({**layout, "tensor_parallel_size": 2}))
    (tag / "complete").write_text(complete_record(tag.name, tag))  # intact, only another layout
    with pytest.raises(ConfigError, match=r"saved at parallel.tensor_parallel_size=2 and this run"):
        Trainer(_config(tiny_data, run)).run()


def test_a_checkpoint_of_another_zero_stage_is_refused_saying_how_to_go_on(
    finished_run, tmp_path, tiny_data
):
    """deepspeed.zero_stage: null picks 0 on one rank and 1 on more, so the same config resumes
    at another stage on another number of ranks (here: the record says so)."""
    run = _copy_to_resume(finished_run, tmp_path)
    tag = run / "checkpoints" / "stage2-step00000002"
    (tag / "layout.json").write_text(json.dumps({"tensor_parallel_size": 1, "zero_stage": 0}))
    (tag / "complete").write_text(complete_record(tag.name, tag))
    with pytest.raises(
        ConfigError,
        match=r"saved at ZeRO stage 0 and this run uses stage 1 .* deepspeed.zero_stage=0$",
    ):
        Trainer(_config(tiny_data, run)).run()


# ----------------------------------------------------------------- issue 30: run files and rules
def test_a_damaged_progress_file_is_named_with_the_way_out_and_the_checkpoints_rule(
    finished_run, tiny_data, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "progress.json").write_text('{"done": ["sta')
    with pytest.raises(RunFileError, match=rf"{run / 'progress.json'}: damaged, not JSON.*mv "):
        Trainer(_config(tiny_data, run))
    (run / "progress.json").rename(run / "progress.json.damaged")
    Trainer(_config(tiny_data, run)).run()  # from the newest checkpoint: step 2, nothing trained
    assert json.loads((run / "progress.json").read_text()) == {"done": ["stage2"]}
    assert _metrics(run) == _metrics(finished_run)


def test_a_damaged_metrics_line_inside_the_file_is_named_with_file_and_line(
    finished_run, tiny_data, tmp_path
):
    run = _copy_to_resume(finished_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{garbage", *lines]) + "\n")
    with pytest.raises(RunFileError, match=rf"{run / 'metrics.jsonl'}:1: damaged.*delete line 1"):
        Trainer(_config(tiny_data, run)).run()


def test_a_budget_below_the_checkpoints_step_is_refused_with_both_numbers(
    finished_run, tiny_data, tmp_path
):
    run = _copy_to_resume(finished_run, tmp_path)
    with pytest.raises(
        ConfigError, match=r"stage2-step00000002 is at step 2 but this run gives the phase 1 steps"
    ):
        Trainer(_config(tiny_data, run, "stage2.max_steps=1")).run()
    assert not (run / "progress.json").exists()  # nothing exported as finished


@pytest.mark.parametrize(
    ("out", "data", "relation"),
    [("d", "d", "is"), ("d/run", "d", "lies inside"), ("r", "r/data", "contains")],
)
def test_an_output_dir_overlapping_the_data_is_refused_before_anything_is_written(
    tiny_data, tmp_path, out, data, relation
):
    out, data = tmp_path / out, tmp_path / data
    shutil.copytree(tiny_data, data)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=rf"output_dir={out} {relation} data.path={data}"):
        Trainer(_config(tiny_data, out, f"data.path={data}"))
    assert sorted(tmp_path.rglob("*")) == before


def test_a_link_leaving_the_run_directory_is_refused_and_its_target_untouched(
    finished_run, tiny_data, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    user = tmp_path / "my_folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    shutil.rmtree(run / "student_hf")
    (run / "student_hf").symlink_to(user)
    (run / "progress.json").unlink()
    with pytest.raises(ConfigError, match=rf"{run / 'student_hf'} -> {user}"):
        Trainer(_config(tiny_data, run))
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    assert not (run / ".student_hf.tmp").exists()


def test_in_training_evaluation_without_a_test_split_is_refused(tiny_data, tmp_path):
    from ted_scale.data.prepare import PrepareConfig, prepare

    no_test = tmp_path / "no_test"
    prepare(
        PrepareConfig(
            input=str(tiny_data.parent / "corpus.txt"),
            out=str(no_test),
            tokenizer=str(tiny_data / "tokenizer"),
            seq_len=64,
            test_fraction=0.0,
            num_workers=0,
            verbose=False,
        )
    )
    with pytest.raises(ConfigError, match=r"eval.interval=1 evaluates .*holds no samples"):
        Trainer(_config(tiny_data, tmp_path / "run", f"data.path={no_test}", "eval.interval=1"))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_save_that_fails_names_the_path_and_what_survives(
    tiny_data, tmp_path, monkeypatch, capsys
):
    from ted_scale.cli.pretrain_ted import run as pretrain

    def disk_full(*args, **kwargs):  # what torch.save raises on a full disk: no errno, no path
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", disk_full)
    argv = [f"data.path={tiny_data}", f"output_dir={tmp_path / 'run'}", "log.tensorboard=false"]
    assert pretrain(str(REPO / "configs" / "tiny-kd.yaml"), [*argv, *STEPS]) == 2
    err = capsys.readouterr().err
    tag = tmp_path / "run" / "checkpoints" / "stage2-step00000001"
    assert f"pretrain_ted: error: {tag}: saving the checkpoint failed (PytorchStreamWriter" in err
    assert "GiB free on its filesystem" in err and "no earlier checkpoint" in err


def test_a_model_that_cannot_fit_is_refused_with_both_sizes_before_it_is_built(tiny_data, tmp_path):
    wide = ["teacher.arch.n_embd=65536", "teacher.arch.n_head=64", "teacher.arch.n_layer=48"]
    with pytest.raises(
        ConfigError,
        match=r"the run needs about [\d.]+ GiB .* and this machine has [\d.]+ GiB free.*"
        r"n_layer=48, n_embd=65536.*batch.micro_batch_size=4 and the data's seq_len 64",
    ):
        Trainer(_config(tiny_data, tmp_path / "run", *wide))
    assert not (tmp_path / "run").exists()


def test_the_probes_end_in_one_error_line_from_the_command(
    finished_run, tiny_data, tmp_path, capsys
):
    from ted_scale.cli.pretrain_ted import run as pretrain

    dup = tmp_path / "dup.yaml"
    dup.write_text((REPO / "configs" / "tiny-kd.yaml").read_text() + "seed: 7\n")
    assert pretrain(str(dup), [f"data.path={tiny_data}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretrain_ted: error: {dup}:") and "key 'seed' is given twice" in err
    assert err.count("\n") == 1

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "progress.json").write_bytes(b"\x00\x01")
    argv = [f"data.path={tiny_data}", f"output_dir={run}", "log.tensorboard=false", *STEPS]
    assert pretrain(str(REPO / "configs" / "tiny-kd.yaml"), argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretrain_ted: error: {run / 'progress.json'}: damaged, not JSON")
    assert err.count("\n") == 1
