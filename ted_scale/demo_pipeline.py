"""`make demo`: the whole method end to end, offline, on the machine in front of you.

A one-seed, shorter copy of the method study (`make study`, docs/design.md "The demo"): the same
corpus, tokenizer and held-out split, the same teacher and student shapes, so its held-out
perplexities sit beside the study's mean ± std. Every step runs the same command-line entry a
user runs at scale (``python -m ted_scale.cli.prepare_data``, ``deepspeed --module
ted_scale.cli.pretrain_ted``, ``.evaluate``, ``.report``, ``.plot_metrics``), printed before it runs. Finished steps are kept: running the
demo again resumes where it stopped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ted_scale.distill.methods import load_run_config
from ted_scale.study.config import BASELINE, load_study_config
from ted_scale.study.plan import StudyPaths
from ted_scale.study.runner import corpus_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STUDY_CONFIG = CONFIGS / "study-cpu.yaml"  # the demo takes its corpus settings from the study
# `make study`'s results as committed, relative to the repository (the steps run there)
STUDY_RESULTS = Path("docs/study/results.json")
# Run name (configs/demo-<name>.yaml, with "_" as "-") -> its label in the report and plots.
# `lm` is the "student alone": next-token CE only, from the same blocks with the same budget.
STUDENTS = {
    "lm": "student alone",
    "kd": "KD",
    "lwd": "LWD",
    "ted": "TED",
    "cr_ild": "CR-ILD",
    "minidisc": "MiniDisc",
}
STUDY_ROWS = {"student alone": BASELINE}  # report labels whose study row is not the label itself
LAMBADA_PASSAGES = 500  # the teacher's LAMBADA check: the study's subset (configs/study-cpu.yaml)


def _step(n: int, total: int, title: str) -> None:
    print(f"\n=== [{n}/{total}] {title}", flush=True)


def _run(cmd: list, *, env: dict[str, str]) -> None:
    printable = shlex.join(str(c) for c in cmd).replace(sys.executable, "python")
    print(f"$ {printable}", flush=True)
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=REPO)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def _launcher(ranks: int) -> list[str]:
    """``deepspeed --num_gpus N --module`` when its launcher is installed beside this Python."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    if deepspeed.exists():
        return [str(deepspeed), "--num_gpus", str(ranks), "--module"]
    return [sys.executable, "-m"]


def config_file(name: str) -> Path:
    """configs/demo-<name>.yaml of a run name (`cr_ild` -> demo-cr-ild.yaml)."""
    return CONFIGS / f"demo-{name.replace('_', '-')}.yaml"


def setup_note() -> str:
    """The demo's budget, read from its configs, as one line under the table."""
    teacher = load_run_config(config_file("teacher"))
    student = load_run_config(config_file("ted"))
    return (
        f"Demo: one seed; teacher {teacher.stage2.max_steps} steps, students "
        f"{student.stage1.max_steps} Stage I + {student.stage2.max_steps} Stage II steps "
        f"(configs/demo-*.yaml), on the study's corpus, tokenizer and held-out split."
    )


def run_demo(out: Path, *, ranks: int = 2, study_results: Path = STUDY_RESULTS) -> None:
    """Run the five demo steps into ``out`` and print where the report and plots are."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if ranks > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    study = load_study_config(STUDY_CONFIG)
    data = out / "data"
    teacher = out / "teacher"
    runs = {name: out / name for name in STUDENTS}

    c = study.corpus
    _step(1, 5, f"Preparing the study's corpus ({c.path}) with a {c.vocab_size}-token BPE")
    corpus = corpus_file(study, StudyPaths(out))
    _run(
        [
            sys.executable,
            "-m",
            "ted_scale.cli.prepare_data",
            "--input",
            corpus,
            "--out",
            data,
            "--train-tokenizer",
            c.vocab_size,
            "--seq-len",
            c.seq_len,
            "--test-fraction",
            c.test_fraction,
        ],
        env=env,
    )

    def train(name: str, run_dir: Path, *overrides: str) -> None:
        _run(
            [
                *_launcher(ranks),
                "ted_scale.cli.pretrain_ted",
                "--config",
                config_file(name),
                f"output_dir={run_dir}",
                f"data.path={data}",
                *overrides,
            ],
            env=env,
        )

    _step(2, 5, "Pre-training the teacher (6 layers, width 128) from scratch, as the study's")
    train("teacher", teacher)

    _step(
        3,
        5,
        "Training 3-layer students from the teacher's blocks: alone (next-token CE only), KD, "
        "LWD, TED (Stage I + Stage II), CR-ILD, and MiniDisc (a teacher assistant, then TED)",
    )
    for name in STUDENTS:
        train(name, runs[name], f"teacher.pretrained={teacher / 'student_hf'}")

    _step(4, 5, "Evaluating on the held-out split (and the teacher on LAMBADA)")
    results = out / "results"
    models = {"teacher": teacher, **runs}
    for name, run_dir in models.items():
        # The teacher is also checked on LAMBADA: if the best model here predicts no last word,
        # no student will, and the report leaves the task out. --max-examples caps only LAMBADA
        # (the held-out split is 36 batches of 16).
        tasks = ["--tasks", "heldout,lambada", "--max-examples", LAMBADA_PASSAGES]
        _run(
            [
                sys.executable,
                "-m",
                "ted_scale.cli.evaluate",
                "--model",
                run_dir,
                "--data",
                data,
                *(tasks if name == "teacher" else ["--tasks", "heldout"]),
                "--batch-size",
                study.eval.batch_size,
                "--out",
                results / f"{name}.json",
            ],
            env=env,
        )

    _step(5, 5, "Writing the Table-1-style report and the Figure-2-style plots")
    table = out / "table1.md"
    _run(
        [
            sys.executable,
            "-m",
            "ted_scale.cli.report",
            "--results",
            f"teacher={results / 'teacher.json'}",
            *(f"{label}={results / f'{name}.json'}" for name, label in STUDENTS.items()),
            "--study",
            study_results,
            "--study-rows",
            *(f"{label}={row}" for label, row in STUDY_ROWS.items()),
            "--note",
            setup_note(),
            "--note",
            "WikiText-2 test (6x the held-out split's tokens) is not scored by the demo, to keep "
            "it short; `make study` scores it.",
            "--out",
            table,
        ],
        env=env,
    )
    figures = out / "figures"
    _run(
        [
            sys.executable,
            "-m",
            "ted_scale.cli.plot_metrics",
            "--runs",
            *(f"{label}={runs[name]}" for name, label in STUDENTS.items()),
            "--out",
            figures,
        ],
        env=env,
    )

    print(f"\n{table.read_text()}")
    print(f"report:  {table}")
    for png in sorted(figures.glob("*.png")):
        print(f"plot:    {png}")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
