"""`make demo`: the whole method end to end, offline, on the machine in front of you.

Every step runs the same command-line entry a user runs at scale (``prepare_data.py``,
``deepspeed pretrain_ted.py``, ``evaluate.py``, ``report.py``, ``plot_metrics.py``), printed before
it runs. Finished steps are kept: running the demo again resumes where it stopped.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ted_scale.eval.datafiles import asset

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIGS = REPO / "configs"
# Run name (configs/demo-<name>.yaml, with "_" as "-") -> its label in the report and plots.
STUDENTS = {"kd": "KD", "lwd": "LWD", "ted": "TED", "cr_ild": "CR-ILD", "minidisc": "MiniDisc"}


def _step(n: int, total: int, title: str) -> None:
    print(f"\n=== [{n}/{total}] {title}", flush=True)


def _run(cmd: list[str], *, env: dict[str, str]) -> None:
    printable = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    print(f"$ {printable}", flush=True)
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=REPO)


def _launcher(ranks: int) -> list[str]:
    """``deepspeed --num_gpus N`` when its launcher is installed beside this Python."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    if deepspeed.exists():
        return [str(deepspeed), "--num_gpus", str(ranks)]
    return [sys.executable]


def run_demo(out: Path, *, ranks: int = 2) -> None:
    """Run the five demo steps into ``out`` and print where the report and plots are."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if ranks > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    data = out / "data"
    teacher = out / "teacher"
    runs = {name: out / name for name in STUDENTS}

    _step(
        1,
        5,
        "Preparing the bundled corpus (WikiText-2 valid, CC BY-SA 3.0) with a BPE trained on it",
    )
    corpus = out / "corpus" / "wikitext-2-valid.txt"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(asset("wikitext-2-valid.txt.gz"), "rb") as src, corpus.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    _run(
        [
            sys.executable,
            LAUNCH / "prepare_data.py",
            "--input",
            corpus,
            "--out",
            data,
            "--train-tokenizer",
            "2048",
            "--seq-len",
            "128",
        ],
        env=env,
    )

    def train(config: str, run_dir: Path, *overrides: str) -> None:
        _run(
            [
                *_launcher(ranks),
                LAUNCH / "pretrain_ted.py",
                "--config",
                CONFIGS / config,
                f"output_dir={run_dir}",
                f"data.path={data}",
                *overrides,
            ],
            env=env,
        )

    _step(2, 5, "Pre-training a small GPT-2-shaped teacher (6 layers, width 128) from scratch")
    train("demo-teacher.yaml", teacher)

    _step(
        3,
        5,
        "Distilling a 3-layer student: TED (Stage I + Stage II), KD, LWD and CR-ILD, and MiniDisc "
        "(a teacher assistant chosen in one trial, then TED from it)",
    )
    for name in ("ted", "kd", "lwd", "cr_ild", "minidisc"):
        config = f"demo-{name.replace('_', '-')}.yaml"
        train(config, runs[name], f"teacher.pretrained={teacher / 'student_hf'}")

    _step(4, 5, "Evaluating teacher and students: held-out text, WikiText-2 test, LAMBADA")
    results = out / "results"
    models = {"teacher": teacher, **runs}
    for name, run_dir in models.items():
        _run(
            [
                sys.executable,
                LAUNCH / "evaluate.py",
                "--model",
                run_dir,
                "--data",
                data,
                "--tasks",
                "heldout,wikitext,lambada",
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
            LAUNCH / "report.py",
            "--results",
            f"teacher={results / 'teacher.json'}",
            *(f"{label}={results / f'{name}.json'}" for name, label in STUDENTS.items()),
            "--out",
            table,
        ],
        env=env,
    )
    figures = out / "figures"
    _run(
        [
            sys.executable,
            LAUNCH / "plot_metrics.py",
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
