"""A study reuses a run or the prepared corpus only while its fingerprint holds, holds a lock on its
`output_dir`, and a study killed and re-run reports what an uninterrupted one reports (issue 30)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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
