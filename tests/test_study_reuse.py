"""A study reuses a run or the prepared corpus only while its fingerprint holds, holds a lock on its
`output_dir`, and a study killed and re-run reports what an uninterrupted one reports (issue 30)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ted_scale.io import atomic_write_json
from ted_scale.study.config import CorpusConfig, StudyConfig
from ted_scale.study.plan import DONE_FILE, StudyPaths
from ted_scale.study.runner import StudyError, plan_jobs, prepare_corpus, run_study

REPO = Path(__file__).resolve().parents[1]


def _study(root: Path, **student: dict) -> StudyConfig:
    return StudyConfig(
        output_dir=str(root),
        seeds=[1],
        student={"student": {"n_layer": 2}, "stage2": {"max_steps": 5}, **student},
        methods=["ted"],
    )


def _finish(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / DONE_FILE, {"eval": {}})


def _planned(study: StudyConfig, inputs: dict | None = None) -> list[str]:
    jobs, _ = plan_jobs(study, StudyPaths(Path(study.output_dir)), inputs)
    return [j.run_dir.name for j in jobs]


def test_a_finished_run_is_redone_when_its_config_or_an_input_changes(tmp_path, capsys):
    root = tmp_path / "study"
    inputs = {"data": "d1", "teacher": "t1"}
    assert _planned(_study(root), inputs) == ["alone-s1", "ted-s1"]
    for name in ("alone-s1", "ted-s1"):
        _finish(root / "runs" / name)
    assert _planned(_study(root), inputs) == []  # unchanged: both reused

    assert _planned(_study(root, stage2={"max_steps": 7}), inputs) == ["alone-s1", "ted-s1"]
    out = capsys.readouterr().out
    assert f"{root / 'runs' / 'ted-s1'}: not reused (changed: config.stage2.max_steps)" in out
    assert not (root / "runs" / "ted-s1").exists()  # the old run is gone, not mixed in

    for name in ("alone-s1", "ted-s1"):
        _finish(root / "runs" / name)
    assert _planned(_study(root, stage2={"max_steps": 7}), {**inputs, "teacher": "t2"}) == [
        "alone-s1",
        "ted-s1",
    ]
    assert "not reused (changed: inputs.teacher)" in capsys.readouterr().out


def test_a_changed_corpus_is_prepared_again(tmp_path, capsys):
    from ted_scale.eval.datafiles import asset_text

    text = asset_text("wikitext-2-valid.txt.gz", 60_000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    study = _study(tmp_path / "study")
    study.corpus = CorpusConfig(path=str(corpus), vocab_size=300, seq_len=32, test_fraction=0.1)
    paths = StudyPaths(tmp_path / "study")
    prepare_corpus(study, paths, 1)
    first = json.loads((paths.data / "manifest.json").read_text())
    prepare_corpus(study, paths, 1)  # unchanged: reused
    assert "not reused" not in capsys.readouterr().out
    half = text[: len(text) // 2]
    corpus.write_text(half[: half.rfind("\n") + 1], encoding="utf-8")
    prepare_corpus(study, paths, 1)
    assert "data: not reused (changed: input.files)" in capsys.readouterr().out
    again = json.loads((paths.data / "manifest.json").read_text())
    assert again["splits"]["train"]["num_tokens"] < first["splits"]["train"]["num_tokens"]


def test_a_second_study_on_one_output_dir_is_refused_naming_the_holder(tmp_path, subprocess_env):
    root = tmp_path / "study"
    root.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from ted_scale.train.run_lock import "
            "RunLock; RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
            "time.sleep(120)",
            str(root),
        ],
        env=subprocess_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    study = _study(root)
    study.corpus = CorpusConfig(path=str(tmp_path / "never_read.txt"))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            StudyError, match=rf"another study holds {root}: .*\(pid {holder.pid} on"
        ):
            run_study(study)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (root / "data").exists()  # refused before any work


TINY_STUDY = {
    "workers": 1,
    "seeds": [1],
    "teacher": {
        "seed": 1234,
        "teacher": {
            "arch": {"vocab_size": 300, "n_positions": 32, "n_embd": 32, "n_layer": 4, "n_head": 2}
        },
        "student": {"dropout": 0.1},
        "batch": {"global_batch_size": 8, "micro_batch_size": 8},
        "stage2": {"max_steps": 12},
        "log": {"interval": 2, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"interval": 4},
        "eval": {"interval": 4, "heldout_batches": 2, "lambada_examples": 1},
        "deepspeed": {"zero_stage": 0},
    },
    "student": {
        "student": {"n_layer": 2, "dropout": 0.1},
        "batch": {"global_batch_size": 8, "micro_batch_size": 8},
        "stage1": {"max_steps": 4},
        "stage2": {"max_steps": 6},
        "log": {"interval": 2, "tensorboard": False, "progress_bar": False},
        "checkpoint": {"interval": 3},
        "deepspeed": {"zero_stage": 0},
    },
    "methods": ["ted"],
    "eval": {
        "wikitext_source": "bundled",
        "wikitext_articles": 1,
        "lambada": "never",
        "batch_size": 8,
    },
}


def _results(root: Path, approx: bool = False) -> dict[str, dict]:
    """What the report is built from, each run's evaluation and FLOPs, without wall times and
    with the study's directory as `ROOT`; `approx`: floats equal to 1e-5 relative. FLOPs are
    rates divided by rates; and the same `evaluate` command on byte-identical weights has given,
    in 2 of about 10 full-suite runs, WikiText log-likelihoods 1.5e-7 apart (relative; every
    rerun alone, idle or loaded, gave one value: cause not found), which the word perplexity,
    exp of a mean of about 19 nats, turns into 2.7e-6. The weights are compared byte for byte."""

    def numbers(value):
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items() if not k.endswith("seconds")}
        if approx and isinstance(value, float):
            return pytest.approx(value, rel=1e-5)
        return value

    runs = {"teacher": root / "teacher", **{p.name: p for p in (root / "runs").iterdir()}}
    results = {}
    for name, run in runs.items():
        if run.is_dir():
            done = json.loads((run / DONE_FILE).read_text().replace(str(root), "ROOT"))
            results[name] = numbers({k: done[k] for k in ("eval", "flops")})
    return results


@pytest.mark.slow
def test_a_study_killed_in_its_teacher_then_in_a_student_reports_an_uninterrupted_studys_numbers(
    tmp_path, subprocess_env
):
    import yaml

    from ted_scale.eval.datafiles import asset_text

    text = asset_text("wikitext-2-valid.txt.gz", 60_000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    config = tmp_path / "study.yaml"
    corpus_keys = {"path": str(corpus), "vocab_size": 300, "seq_len": 32, "test_fraction": 0.1}
    config.write_text(yaml.safe_dump({**TINY_STUDY, "corpus": corpus_keys}))

    started: list[subprocess.Popen] = []

    def study(root: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ted_scale.cli.study", "--config", str(config)]
        started.append(
            subprocess.Popen(
                [*cmd, f"output_dir={root}"],
                env={**subprocess_env, "DS_ACCELERATOR": "cpu"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # one process group, to clean up after a failure
            )
        )
        return started[-1]

    def kill_at(proc: subprocess.Popen, marker: Path) -> None:
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # The study alone: the run it started dies with it, or it would hold its run's lock.
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert marker.exists(), f"the study went on without writing {marker}"

    try:
        whole = study(tmp_path / "whole")
        assert whole.wait(600) == 0, whole.stderr.read()[-4000:]
        root = tmp_path / "killed"
        # Kill after the teacher's checkpoint at step 8, then after the TED student's at step 3.
        kill_at(study(root), root / "teacher" / "checkpoints" / "lm-step00000008" / "complete")
        student = root / "runs" / "ted-s1" / "checkpoints" / "stage2-step00000003"
        kill_at(study(root), student / "complete")
        again = study(root)
        assert again.wait(600) == 0, again.stderr.read()[-4000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    exported = sorted(p.relative_to(root) for p in root.rglob("model.safetensors"))
    assert len(exported) == 4  # the teacher, the students' initialisation, both students
    for path in exported:
        assert (root / path).read_bytes() == (tmp_path / "whole" / path).read_bytes(), path
    assert _results(root) == _results(tmp_path / "whole", approx=True)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (dead, waiting for whoever inherited it to reap it,
    which a container's init may do late) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("killed", ["while_it_runs", "before_it_starts"])
def test_a_killed_study_takes_its_commands_with_it(killed, tmp_path, subprocess_env):
    """A command left running would hold its run's lock against the study's re-run; a command
    whose study died before it came up (handed to another parent already) must see it too."""
    log = tmp_path / "command.log"
    late = "time.sleep(2); " if killed == "before_it_starts" else ""
    command = (
        f"import time; {late}import ted_scale.cli; print('READY', flush=True); time.sleep(120)"
    )
    study = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from ted_scale.study.runner import run_logged; "
            f"run_logged([sys.executable, '-c', {command!r}], Path(sys.argv[1]), 1)",
            str(log),
        ],
        env=subprocess_env,
        start_new_session=True,  # one process group, to clean up after a failure
    )
    children = Path(f"/proc/{study.pid}/task/{study.pid}/children")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (
            log.exists() and "READY" in log.read_text().splitlines()  # not the logged command
            if killed == "while_it_runs"
            else children.exists() and children.read_text().split()
        ):
            time.sleep(0.05)
        (child,) = map(int, children.read_text().split())
        study.send_signal(signal.SIGKILL)
        study.wait()
        deadline = time.time() + 30  # a loaded machine; the loop ends as soon as it is gone
        while _running(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the command outlived the study"
        if killed == "before_it_starts":
            assert "READY" not in log.read_text().splitlines(), "it came up without its study"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(study.pid, signal.SIGKILL)
