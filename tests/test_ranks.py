"""Two CPU ranks under torchrun stop together with one clear line when one of them refuses an input,
and die with their launcher (issue 30, item 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ted_scale.config import ConfigError
from ted_scale.distill.methods import load_run_config
from ted_scale.parallel.dims import free_port
from ted_scale.train.run_lock import RunLock
from ted_scale.train.safe_checkpoint import complete_record
from ted_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = ("stage2.max_steps=2", "checkpoint.interval=1", "checkpoint.keep=5")
TAG = "stage2-step00000002"

pytestmark = pytest.mark.slow


def _command(launcher: list[str], data: Path, out: Path, *overrides: str) -> list[str]:
    return [
        *launcher,
        str(REPO / "launch" / "pretrain_ted.py"),
        "--config",
        str(REPO / "configs" / "tiny-kd.yaml"),
        f"data.path={data}",
        f"output_dir={out}",
        "log.tensorboard=false",
        *STEPS,
        *overrides,
    ]


def _torchrun() -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port())]


def _run(env: dict[str, str], cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300
    )


def _finished(env: dict[str, str], data: Path, out: Path, *overrides: str) -> Path:
    proc = _run(env, _command(_torchrun(), data, out, *overrides))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, tmp_path_factory, subprocess_env) -> Path:
    """A finished 2-step KD run on 2 data-parallel ranks (ZeRO-1), checkpoints at steps 1 and 2."""
    return _finished(subprocess_env, tiny_data, tmp_path_factory.mktemp("dp2") / "run")


def _copy_to_resume(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "progress.json").unlink()
    return copy


def _assert_every_rank_says(proc: subprocess.CompletedProcess, message: str) -> None:
    """Both ranks end with the same error line; no rank prints a traceback; torchrun's failure
    summary carries the line."""
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("pretrain_ted: error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], text[-4000:]
    assert message in errors[0]
    assert f"traceback : {errors[0]}" in text
    assert proc.returncode != 0
    # torchrun raises ChildFailedError itself; no rank may add a traceback of its own.
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-4000:]
    assert "gloo" not in text.lower(), text[-4000:]


def test_a_run_lock_held_by_another_run_stops_both_ranks_naming_the_holder(
    two_rank_run, tiny_data, tmp_path, subprocess_env, lock_holder
):
    run = _copy_to_resume(two_rank_run, tmp_path)
    holder = lock_holder(run)
    proc = _run(subprocess_env, _command(_torchrun(), tiny_data, run))
    _assert_every_rank_says(proc, f"{run} is in use by another run (pid {holder.pid} on")


@pytest.mark.parametrize("tp", [1, 2], ids=["data-parallel", "tensor-parallel"])
def test_a_bad_rng_file_of_rank_1_stops_both_ranks_naming_it(
    tp, two_rank_run, tiny_data, tmp_path, subprocess_env
):
    layout = f"parallel.tensor_parallel_size={tp}"
    finished = (
        two_rank_run if tp == 1 else _finished(subprocess_env, tiny_data, tmp_path / "tp2", layout)
    )
    run = _copy_to_resume(finished, tmp_path)
    tag = run / "checkpoints" / TAG
    (tag / "rng_rank1.safetensors").write_bytes(b"not safetensors")
    (tag / "complete").write_text(complete_record(TAG, tag))  # intact, only a bad file
    proc = _run(subprocess_env, _command(_torchrun(), tiny_data, run, layout))
    _assert_every_rank_says(proc, f"{tag / 'rng_rank1.safetensors'}: not a ted_scale RNG state")


def test_a_zero_checkpoint_of_two_ranks_resumed_on_one_is_refused_naming_both_sizes(
    two_rank_run, tiny_data, tmp_path
):
    run = _copy_to_resume(two_rank_run, tmp_path)
    config = load_run_config(
        REPO / "configs" / "tiny-kd.yaml",
        [f"data.path={tiny_data}", f"output_dir={run}", "log.tensorboard=false", *STEPS],
    )
    with pytest.raises(
        ConfigError, match=r"saved by 2 data-parallel ranks and this run has 1: ZeRO partitioned"
    ):
        Trainer(config).run()


def test_an_evaluation_error_inside_training_is_one_error_line(tiny_data, tmp_path, subprocess_env):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"text": "word"}) + "\n")
    proc = _run(
        subprocess_env,
        _command(
            [sys.executable],
            tiny_data,
            tmp_path / "run",
            "eval.interval=1",
            f"eval.lambada_path={lambada}",
        ),
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pretrain_ted: error: {lambada}:1: 'text' must be a passage of several words"
    )


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Not yet a zombie whose threads have all exited (a multi-threaded rank's main thread shows
    as a zombie while its other threads, holding its files, still exit)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return False
    return state != "Z" or threads > 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_killed_torchrun_and_free_the_run(tiny_data, tmp_path, subprocess_env):
    run = tmp_path / "run"
    cmd = _command(_torchrun(), tiny_data, run, "stage2.max_steps=100000", "checkpoint.interval=0")
    launcher = subprocess.Popen(
        cmd,
        env={**subprocess_env, "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            assert launcher.poll() is None, "the run ended before training"
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 30
    while any(map(_alive, ranks)) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in ranks if _alive(pid)]
    for pid in survivors:  # not left training for hours when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "the ranks outlived their launcher"
    RunLock(run).acquire().release()  # free for the next run
