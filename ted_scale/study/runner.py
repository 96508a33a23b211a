"""Run a study: prepare the corpus, pre-train and evaluate the teacher, then train and evaluate
every (row, seed) student, `workers` at a time, each as subprocesses of the public entries
(`ted_scale.cli.prepare_data`, `.pretrain_ted`, `.evaluate`, each run as `python -m`).

Resumable: a run whose `study.json` exists and whose fingerprint (`ted_scale/study/reuse.py`:
resolved configuration, inputs, evaluation settings) is unchanged is skipped; a changed one is
redone. An interrupted run resumes from its own checkpoints (`resume: auto`), and an interrupted
corpus preparation resumes too. A study holds a lock on its `output_dir` while it runs.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ted_scale.data.sources import SourceSpec, input_fingerprint
from ted_scale.data.tokenizer import load_tokenizer
from ted_scale.distill.layer_map import resolve_layer_map
from ted_scale.distill.methods import PhaseKind, get_method, load_run_config
from ted_scale.eval.datafiles import asset
from ted_scale.eval.plots import read_metrics
from ted_scale.io import atomic_write_json
from ted_scale.model import export_hf, load_pretrained, student_from_teacher
from ted_scale.process import DIE_WITH_PARENT
from ted_scale.study.config import StudyConfig
from ted_scale.study.plan import (
    DONE_FILE,
    Row,
    StudyPaths,
    is_done,
    read_done,
    rows,
    student_config,
    teacher_config,
    write_run_config,
)
from ted_scale.study.reuse import Fingerprint, claim, data_digest, digest, flatten, run_fingerprint
from ted_scale.train.run_lock import RunLock, RunLockedError


class StudyError(RuntimeError):
    """A step of the study failed; the message names it and its log file."""


@dataclass
class Job:
    """One student run to train and evaluate."""

    row: Row
    seed: int
    run_dir: Path
    config_path: Path


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_logged(cmd: Sequence[str | os.PathLike], log_path: Path, threads: int) -> None:
    """Run `cmd`, appending its output to `log_path`; StudyError naming the log if it fails."""
    # DIE_WITH_PARENT: a study killed with -9 takes its commands with it (they would go on
    # training, holding their run's lock against the study's re-run).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env[DIE_WITH_PARENT] = str(os.getpid())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(f"$ {' '.join(str(c) for c in cmd)}\n")
        f.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise StudyError(f"{Path(str(cmd[1])).name} failed (see {log_path}): {tail[0]}")


def corpus_file(study: StudyConfig, paths: StudyPaths) -> Path:
    """The corpus as a file `prepare_data.py` reads (a bundled `.gz` is decompressed once)."""
    spec = study.corpus.path
    if not spec.startswith("bundled:"):
        return Path(spec)
    name = spec.removeprefix("bundled:")
    out = paths.corpus_dir / name.removesuffix(".gz")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with gzip.open(asset(name), "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(out)
    return out


def prepare_corpus(study: StudyConfig, paths: StudyPaths, threads: int) -> None:
    """Prepare the corpus into `paths.data`, unless it holds this corpus with these settings."""
    source = corpus_file(study, paths)
    fingerprint = flatten(study.corpus, "corpus.") | flatten(
        input_fingerprint(SourceSpec(str(source))), "input."
    )
    if claim(paths.data, fingerprint, log) and (paths.data / "manifest.json").is_file():
        return
    c = study.corpus
    log(f"preparing {c.path}: BPE of {c.vocab_size} tokens, {c.seq_len}-token samples")
    cmd = [sys.executable, "-m", "ted_scale.cli.prepare_data", "--input", source]
    cmd += ["--out", paths.data, "--train-tokenizer", c.vocab_size, "--seq-len", c.seq_len]
    cmd += ["--test-fraction", c.test_fraction, "--quiet"]
    run_logged(cmd, paths.root / "logs" / "prepare.log", threads)


def phase_flops(
    run_dir: Path, tokens_per_step: int, kinds: dict[str, PhaseKind]
) -> dict[str, float | None]:
    """Training FLOPs before Stage II ("stage1") and of Stage II ("stage2"), from `metrics.jsonl`.

    `kinds` maps the method's phase names to their kind: its `filters` phases (TED's Stage I,
    CR-ILD's ILD phase, MiniDisc's sandwich and its final hop's Stage I) are "stage1", its
    `distill` phases (Stage II, or CE training) "stage2". A phase's FLOPs per token are the
    trainer's own count (`tflops_per_device / tokens_per_s`, one rank); its tokens are its last
    logged step times `tokens_per_step`.
    """
    by_phase: dict[str, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        rate, tflops = record.get("tokens_per_s"), record.get("tflops_per_device")
        if rate and tflops is not None and record.get("stage") in kinds:
            by_phase[record["stage"]] = tflops * 1e12 / rate * record["step"] * tokens_per_step
    totals: dict[str, float | None] = {}
    for key, kind in (("stage1", "filters"), ("stage2", "distill")):
        values = [v for name, v in by_phase.items() if kinds[name] == kind]
        totals[key] = sum(values) if values else None
    return totals


def phase_kinds(config_path: Path) -> dict[str, PhaseKind]:
    """{phase name: kind} of the run configured by `config_path`, from its method's plan."""
    config = load_run_config(config_path)
    return {p.name: p.kind for p in get_method(config.method).plan(config)}


def tokens_per_step(raw: dict[str, Any], seq_len: int) -> int:
    return int(raw.get("batch", {}).get("global_batch_size", 4000)) * seq_len


def evaluate(
    study: StudyConfig, paths: StudyPaths, run_dir: Path, lambada: bool, threads: int
) -> dict[str, Any]:
    """Held-out, WikiText-2 test (and LAMBADA) results of a trained run, via `evaluate.py`.

    One call per task whose size cap differs (`--max-examples` caps every task of a call).
    """
    e = study.eval
    base = [sys.executable, "-m", "ted_scale.cli.evaluate", "--model", run_dir]
    base += [
        "--data",
        paths.data,
        "--batch-size",
        e.batch_size,
        "--wikitext-source",
        e.wikitext_source,
    ]
    calls: dict[str, int | None] = {"heldout": None, "wikitext": e.wikitext_articles}
    if lambada:
        calls["lambada"] = e.lambada_examples
    results: dict[str, Any] = {}
    for task, cap in calls.items():
        out = run_dir / "eval" / f"{task}.json"
        cmd = [*base, "--tasks", task, "--out", out]
        run_logged(cmd + (["--max-examples", cap] if cap else []), run_dir / "study.log", threads)
        results |= {k: v for k, v in read_json(out).items() if k == task}
    return results


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def train_and_evaluate(
    study: StudyConfig,
    paths: StudyPaths,
    run_dir: Path,
    config_path: Path,
    raw: dict[str, Any],
    *,
    lambada: bool,
    threads: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Train `config_path` into `run_dir`, evaluate it, and write its `study.json`."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ted_scale.cli.pretrain_ted", "--config", config_path]
    run_logged(cmd, run_dir / "study.log", threads)
    trained = time.perf_counter()
    results = evaluate(study, paths, run_dir, lambada, threads)
    done = {
        **extra,
        "eval": results,
        "flops": phase_flops(
            run_dir, tokens_per_step(raw, study.corpus.seq_len), phase_kinds(config_path)
        ),
        "train_seconds": round(trained - start, 1),
        "eval_seconds": round(time.perf_counter() - trained, 1),
    }
    atomic_write_json(run_dir / DONE_FILE, done)
    return done


def export_student_init(study: StudyConfig, paths: StudyPaths, teacher: str) -> str:
    """The teacher's blocks at the layer map as an HF folder: the CE-only baseline's start.
    `teacher`: the teacher's fingerprint digest; returns this folder's."""
    student = study.student.get("student", {})
    fingerprint = {"teacher": teacher, **flatten(student, "student.")}
    if (
        claim(paths.student_init, fingerprint, log)
        and (paths.student_init / "config.json").is_file()
    ):
        return digest(fingerprint)
    teacher_dir = paths.teacher / "student_hf"
    teacher = load_pretrained(str(teacher_dir))
    layer_map = resolve_layer_map(
        student.get("layer_map"), len(teacher.blocks), int(student.get("n_layer", 6))
    )
    export_hf(
        student_from_teacher(teacher, layer_map), paths.student_init, load_tokenizer(teacher_dir)
    )
    return digest(fingerprint)


def lambada_decision(study: StudyConfig, teacher_eval: dict[str, Any]) -> tuple[bool, str]:
    """Whether the students are scored on LAMBADA, and why (written into the report)."""
    mode = study.eval.lambada
    if mode == "never":
        return False, "LAMBADA left out by the study config (eval.lambada: never)."
    if mode == "always":
        return True, "LAMBADA scored for every model (eval.lambada: always)."
    acc = teacher_eval.get("lambada", {}).get("accuracy", 0.0)
    if acc < study.eval.lambada_min_accuracy:
        return False, (
            f"LAMBADA left out: the teacher predicts {100 * acc:.2f} % of its last words "
            f"(below {100 * study.eval.lambada_min_accuracy:.0f} %); a model this small, trained "
            "only on the study corpus with its own tokenizer, cannot do the task, and a column of "
            "near-zero accuracies would compare nothing."
        )
    return True, f"LAMBADA kept: the teacher's accuracy is {100 * acc:.2f} %."


def plan_jobs(
    study: StudyConfig, paths: StudyPaths, inputs: Fingerprint | None = None
) -> tuple[list[Job], dict[str, str]]:
    """Every (row, seed) run still to do, and the rows the installed trainer cannot run.

    `inputs`: what the run configs name only by path (data, teacher, baseline start) and the
    evaluation settings; a finished run is reused only if they and its config are unchanged.
    """
    jobs: list[Job] = []
    missing: dict[str, str] = {}
    for row in rows(study):
        for seed in study.seeds:
            run_dir = paths.run_dir(row.name, seed)
            config_path = paths.root / "configs" / f"{run_dir.name}.yaml"
            reason = write_run_config(student_config(study, paths, row, seed), config_path)
            if reason is not None:
                missing[row.name] = reason
                break
            claim(run_dir, run_fingerprint(config_path, inputs or {}), log)
            if not is_done(run_dir):
                jobs.append(Job(row, seed, run_dir, config_path))
    return jobs, missing


def execute(jobs: Sequence[Job], workers: int, work: Callable[[Job], None]) -> dict[str, str]:
    """Run `work(job)` for each job, `workers` at a time; {run name: error} for those that fail."""
    failures: dict[str, str] = {}

    def guarded(job: Job) -> None:
        try:
            work(job)
        except StudyError as e:
            failures[job.run_dir.name] = str(e)
            log(f"FAILED {job.run_dir.name}: {e}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(guarded, jobs))
    return failures


def run_study(study: StudyConfig) -> dict[str, Any]:
    """Run (or finish) the study; returns {"missing": rows not implemented, "failures": ...}."""
    paths = StudyPaths(Path(study.output_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(paths.root).acquire()
    except RunLockedError as e:
        raise StudyError(f"another study holds {paths.root}: {e}") from None
    try:
        return _run_study(study, paths)
    finally:
        lock.release()


def _run_study(study: StudyConfig, paths: StudyPaths) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // study.workers)
    prepare_corpus(study, paths, cores)

    raw_teacher = teacher_config(study, paths)
    teacher_yaml = paths.root / "configs" / "teacher.yaml"
    write_run_config(raw_teacher, teacher_yaml)
    evaluation = flatten(study.eval)
    data = data_digest(paths.data)
    teacher = run_fingerprint(teacher_yaml, {"data": data, "eval": evaluation})
    claim(paths.teacher, teacher, log)
    if not is_done(paths.teacher):
        log("pre-training the teacher")
        train_and_evaluate(
            study,
            paths,
            paths.teacher,
            teacher_yaml,
            raw_teacher,
            lambada=study.eval.lambada != "never",
            threads=cores,
            extra={"row": "teacher", "method": "lm"},
        )
    teacher_done = read_done(paths.teacher)
    lambada, lambada_note = lambada_decision(study, teacher_done["eval"])
    student_init = export_student_init(study, paths, digest(teacher))

    inputs = {
        "data": data,
        "teacher": digest(teacher),
        "student_init": student_init,
        "eval": evaluation,
        "lambada": lambada,
    }
    jobs, missing = plan_jobs(study, paths, inputs)
    for name, reason in missing.items():
        log(f"row {name!r}: not yet implemented by the installed trainer ({reason})")
    raws = {job.run_dir: student_config(study, paths, job.row, job.seed) for job in jobs}
    log(f"{len(jobs)} student runs to do, {study.workers} at a time, {threads} thread(s) each")

    def work(job: Job) -> None:
        start = time.perf_counter()
        log(f"start {job.run_dir.name}")
        train_and_evaluate(
            study,
            paths,
            job.run_dir,
            job.config_path,
            raws[job.run_dir],
            lambada=lambada,
            threads=threads,
            extra={"row": job.row.name, "method": job.row.method, "seed": job.seed},
        )
        log(f"done  {job.run_dir.name} in {time.perf_counter() - start:.0f} s")

    failures = execute(jobs, study.workers, work)
    return {
        "missing": missing,
        "failures": failures,
        "lambada": lambada_note,
        "lambada_included": lambada,
    }
