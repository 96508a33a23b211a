"""Shared fixtures: tiny models, so the suite stays fast on two CPU cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ted_scale.model import GPT, GPTConfig


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """The environment for a training run in a child process: a fresh process group (without what
    this process's own group put in the environment), one thread, unbuffered output."""
    dist_keys = {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
    env = {k: v for k, v in os.environ.items() if k not in dist_keys}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def one_thread():
    """Torch on one thread: two threads fight over two shared cores, and one is faster for the
    tiny models of the tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_at():
    """``kill_at(proc, marker)``: wait until ``marker`` exists (or ``proc`` ends), then SIGKILL
    ``proc``; fails when the marker never appeared."""

    def kill(proc: subprocess.Popen, marker: Path, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert marker.exists(), f"the run ended before writing {marker}"

    return kill


@pytest.fixture
def lock_holder(subprocess_env):
    """``lock_holder(run_dir)``: another process holding ``run_dir``'s run lock until it is killed
    (at the latest when the test ends)."""
    holders: list[subprocess.Popen] = []

    def hold(run_dir: Path) -> subprocess.Popen:
        code = (
            "import sys, time; from pathlib import Path; from ted_scale.train.run_lock import "
            "RunLock; RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
            "time.sleep(120)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(run_dir)],
            env=subprocess_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=101, n_positions=64, n_embd=48, n_layer=4, n_head=4, dropout=0.0)


@pytest.fixture
def tiny_gpt(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared data directory: 300 kB of the bundled WikiText-2 valid split, a 512-token BPE,
    64-token samples (what configs/tiny-*.yaml expect)."""
    from ted_scale.data.prepare import PrepareConfig, prepare
    from ted_scale.eval.datafiles import asset_text

    root = tmp_path_factory.mktemp("tiny_data")
    text = asset_text("wikitext-2-valid.txt.gz", 300_000)
    corpus = root / "corpus.txt"
    corpus.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    out = root / "prepared"
    prepare(
        PrepareConfig(
            input=str(corpus),
            out=str(out),
            train_tokenizer=512,
            seq_len=64,
            num_workers=0,
            verbose=False,
        )
    )
    return out
