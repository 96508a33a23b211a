"""Across nodes (docs/multinode.md).

Two "nodes" on one machine: two `torchrun --nnodes 2 --nproc_per_node 1` launchers that meet at a
c10d rendezvous on localhost, one gloo rank each, sharing the run directory as nodes share a
filesystem. The tiny TED run must lose exactly what one node with two ranks loses; a node killed
with -9 must stop the other with a message, and `resume=auto` on both nodes must finish the run as
if nothing happened. A node that hangs instead (no connection closed) is the peer watch's
(ted_scale/parallel/watch.py), tested here on an in-process store."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from ted_scale.parallel.dims import (
    ParallelLayoutError,
    _ranks_from_slurm,
    _tasks_per_node,
    free_port,
)
from ted_scale.parallel.watch import LOST_STATUS, PeerWatch, lost_peer_message

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# Stage II long enough that the run is still going when the kill after step 4's checkpoint lands.
RUN = ["stage1.max_steps=2", "stage2.max_steps=12", "checkpoint.interval=2", "checkpoint.keep=10"]
TIMEOUT = 240  # one launch, start to end (a run takes about 30 s on two busy cores)


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    config = str(REPO / "configs" / "tiny-ted.yaml")
    script = str(REPO / "launch" / "pretrain_ted.py")
    return [script, "--config", config, f"data.path={data}", f"output_dir={out}", *RUN, *extra]


def _losses(run_dir: Path) -> list[tuple[str, int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it (its ranks run in sessions of their own)."""
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


class TwoNodes:
    """Two launchers of one job; node 0 hosts the rendezvous store. Logs go to files (two
    processes filling two pipes could block each other)."""

    def __init__(
        self, env: dict[str, str], logs: Path, cmd: list[str], cwds: list[Path] | None = None
    ) -> None:
        port = free_port()
        self.logs = [logs / f"node{n}.log" for n in range(2)]
        self.procs = []
        for node in range(2):
            launcher = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1"]
            launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
            launcher += ["--rdzv_id", f"two-nodes-{port}", "--rdzv_conf", f"is_host={1 - node}"]
            launcher += ["--max_restarts", "0"]
            with self.logs[node].open("w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [*launcher, *cmd],
                        env=env,
                        cwd=cwds[node] if cwds else REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def output(self) -> str:
        return "".join(f"--- node {n}:\n{_log(p)[-6000:]}\n" for n, p in enumerate(self.logs))

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the two-node job ran past {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        for proc in self.procs:
            _kill_tree(proc)


@pytest.fixture
def two_nodes(subprocess_env, tmp_path):
    """``two_nodes(cmd, name[, cwds])``: start the job (node n in ``cwds[n]``); every launcher
    left is killed at the end."""
    jobs: list[TwoNodes] = []
    env = {**subprocess_env, "DS_ACCELERATOR": "cpu"}

    def start(cmd: list[str], name: str, cwds: list[Path] | None = None) -> TwoNodes:
        logs = tmp_path / name
        logs.mkdir()
        jobs.append(TwoNodes(env, logs, cmd, cwds))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


@pytest.fixture(scope="module")
def one_node(tiny_data, tmp_path_factory, subprocess_env) -> list[tuple[str, int, float]]:
    """The reference: the same run on one node with two ranks."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    launcher = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, *_cmd(tiny_data, out)],
        env={**subprocess_env, "DS_ACCELERATOR": "cpu"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return _losses(out)


def _assert_same_losses(got, expected, output: str) -> None:
    assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in expected], output
    for (stage, step, x), (_, _, y) in zip(got, expected, strict=True):
        assert x == pytest.approx(y, rel=1e-5), f"{stage} step {step}: {x} != {y}\n{output}"


@pytest.mark.slow
def test_two_nodes_of_one_rank_train_to_the_losses_of_one_node_of_two(
    tiny_data, tmp_path, one_node, two_nodes
):
    out = tmp_path / "run"
    job = two_nodes(_cmd(tiny_data, out), "full")
    assert job.wait() == [0, 0], job.output()
    _assert_same_losses(_losses(out), one_node, job.output())
    assert (out / "student_hf" / "model.safetensors").is_file(), job.output()


@pytest.mark.slow
def test_a_node_killed_stops_the_other_with_a_message_and_both_resume_to_the_same_losses(
    tiny_data, tmp_path, one_node, two_nodes
):
    out = tmp_path / "run"
    job = two_nodes(_cmd(tiny_data, out, "resume=auto"), "killed")
    marker = out / "checkpoints" / "stage2-step00000004" / "complete"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and None in [p.poll() for p in job.procs]:
        assert time.monotonic() < deadline, f"no {marker} after {TIMEOUT} s:\n{job.output()}"
        time.sleep(0.05)
    assert marker.exists(), f"a node ended before {marker} was written:\n{job.output()}"

    _kill_tree(job.procs[1])  # node 1: its launcher and its rank, as a node lost
    killed = time.monotonic()
    survivor = job.procs[0]
    try:
        status = survivor.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still runs 60 s after node 1 was killed:\n{job.output()}")
    stopped = time.monotonic() - killed
    log = _log(job.logs[0])
    assert status != 0, f"node 0 ended with status 0 after node 1 was killed:\n{job.output()}"
    assert "stops: a collective failed" in log and "resume=auto" in log, job.output()
    assert stopped < 30, f"node 0 took {stopped:.1f} s to stop:\n{job.output()}"

    resumed = two_nodes(_cmd(tiny_data, out, "resume=auto"), "resumed")
    assert resumed.wait() == [0, 0], resumed.output()
    assert "stage2: resumed from" in resumed.output(), resumed.output()
    _assert_same_losses(_losses(out), one_node, resumed.output())


@pytest.mark.slow
def test_a_node_that_hangs_is_named_and_stops_the_other_within_the_peer_timeout(
    tiny_data, tmp_path, two_nodes
):
    """SIGSTOP: the node's connections stay open (a power cut or a cut network look the same from
    the other side), so no collective fails; only the peer watch ends the wait."""
    out = tmp_path / "run"
    job = two_nodes(_cmd(tiny_data, out, "parallel.peer_timeout_s=4"), "hung")
    marker = out / "filters" / "filters.json"  # Stage I is over: the ranks are training
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and None in [p.poll() for p in job.procs]:
        assert time.monotonic() < deadline, f"no {marker} after {TIMEOUT} s:\n{job.output()}"
        time.sleep(0.05)
    assert marker.exists(), f"a node ended before {marker} was written:\n{job.output()}"
    hung = psutil.Process(job.procs[1].pid)
    for p in [hung, *hung.children(recursive=True)]:
        p.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        status = job.procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still runs 60 s after node 1 froze:\n{job.output()}")
    stopped = time.monotonic() - frozen
    log = _log(job.logs[0])
    assert status != 0, job.output()
    assert "has not answered for" in log and "(parallel.peer_timeout_s=4)" in log, job.output()
    assert 2 < stopped < 15, f"node 0 stopped {stopped:.1f} s after node 1 froze:\n{job.output()}"


@pytest.mark.slow
def test_nodes_that_do_not_share_the_run_directory_are_refused_before_training(
    tiny_data, tmp_path, two_nodes
):
    """A relative output_dir from two working directories: two directories named alike, as a
    node-local disk at the same path on each node."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    job = two_nodes(_cmd(tiny_data, Path("run")), "unshared", cwds)
    assert 0 not in job.wait(), job.output()
    for n in range(2):
        assert "does not see what rank 0 on host" in _log(job.logs[n]), job.output()
        assert "shared filesystem" in _log(job.logs[n]), job.output()
    assert not (cwds[0] / "run" / "metrics.jsonl").exists(), job.output()


@pytest.mark.slow
def test_tasks_of_an_srun_step_without_a_launcher_train_to_the_losses_of_one_node(
    tiny_data, tmp_path, one_node, subprocess_env
):
    """What `deepspeed --launcher slurm` starts: the script itself as the tasks of `srun -n 2`
    on two nodes of one task each, with Slurm's variables and no RANK (simulated here)."""
    out, port = tmp_path / "run", free_port()
    procs, logs = [], [tmp_path / f"task{n}.log" for n in range(2)]
    for task in range(2):
        env = {**subprocess_env, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=str(port), SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(task))
        env.update(SLURM_LOCALID="0", SLURM_NODEID=str(task), SLURM_STEP_TASKS_PER_NODE="1(x2)")
        with logs[task].open("w") as log:
            cmd = [sys.executable, *_cmd(tiny_data, out)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log))

    def output() -> str:
        return "".join(f"--- task {n}:\n{_log(p)[-6000:]}\n" for n, p in enumerate(logs))

    try:
        statuses = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for proc in procs:
            _kill_tree(proc)
    assert statuses == [0, 0], output()
    assert "dp=2 tp=1" in output(), output()
    _assert_same_losses(_losses(out), one_node, output())


def test_the_sbatch_example_is_shown_whole_in_the_doc_and_is_valid_bash():
    script = REPO / "docs" / "examples" / "ted_multinode.sbatch"
    assert f"```bash\n{script.read_text()}```\n" in (REPO / "docs" / "multinode.md").read_text()
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_slurm_task_counts_per_node_are_read_in_every_form_slurm_writes():
    assert _tasks_per_node("8(x2)") == [8, 8]
    assert _tasks_per_node("2,1") == [2, 1]
    assert _tasks_per_node("4(x2),2") == [4, 4, 2]
    assert _tasks_per_node("") == []


def test_an_srun_task_without_master_addr_is_refused_naming_what_to_export(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "3")
    with pytest.raises(ParallelLayoutError, match="task 3 of 16 without MASTER_ADDR"):
        _ranks_from_slurm()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task (or the batch script): no group
    assert not _ranks_from_slurm()


# ----------------------------------------------------------------------------- the peer watch
class FreezableStore(dist.Store):
    """An in-process store whose calls block, once frozen, until thawed: a store host that hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = dist.HashStore()
        self.frozen = threading.Event()
        self.thawed = threading.Event()

    def _gate(self) -> None:
        if self.frozen.is_set():
            self.thawed.wait(timeout=30)

    def set(self, key, value):
        self._gate()
        self.inner.set(key, value)

    def get(self, key):
        self._gate()
        return self.inner.get(key)

    def check(self, keys):
        self._gate()
        return self.inner.check(keys)


class Exits:
    """Stands for ``os._exit``: records each status and the time it came."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.cond = threading.Condition()

    def __call__(self, status: int) -> None:
        with self.cond:
            self.statuses.append(status)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.statuses) >= n, timeout=timeout)


def test_a_rank_that_stops_answering_stops_every_other_rank_with_a_message_naming_it(capfd):
    store, exits = dist.HashStore(), [Exits() for _ in range(3)]
    watches = [PeerWatch(r, 3, 0.4, store=store, exit_process=exits[r]) for r in range(3)]
    for watch in watches:
        watch.start()
    try:
        watches[1].stop()  # rank 1 hangs: no beat, no exit of its own
        start = time.monotonic()
        assert exits[0].wait_for(1, timeout=10) and exits[2].wait_for(1, timeout=10), (
            capfd.readouterr().err
        )
        took = time.monotonic() - start
    finally:
        for watch in watches:
            watch.stop()
    err = capfd.readouterr().err
    assert exits[0].statuses == exits[2].statuses == [LOST_STATUS], err
    assert exits[1].statuses == [], err
    assert 0.2 < took < 3, f"rank 1 found lost after {took:.2f} s with a 0.4 s timeout:\n{err}"
    for rank in (0, 2):  # rank 0 watches rank 1; rank 2 reads what rank 0 published
        assert f"ted_scale: error: rank {rank} stops: rank 1 (host " in err, err
    assert "resume=auto" in err, err


def test_a_store_that_stops_answering_stops_the_rank_naming_the_store(capfd):
    store, exits = FreezableStore(), Exits()
    watch = PeerWatch(0, 2, 0.4, store=store, exit_process=exits)
    peer = PeerWatch(1, 2, 0.4, store=store, exit_process=Exits())
    watch.start()
    peer.start()
    try:
        store.frozen.set()  # every call blocks from now on: the host of the store hangs
        assert exits.wait_for(1, timeout=10), capfd.readouterr().err
    finally:
        store.thawed.set()
        watch.stop()
        peer.stop()
    err = capfd.readouterr().err
    assert exits.statuses == [LOST_STATUS], err
    assert "rank 0 stops: the rendezvous store" in err and "stopped answering" in err, err


def test_ranks_that_stop_their_watch_together_are_not_taken_for_lost():
    store, exits = dist.HashStore(), [Exits(), Exits()]
    watches = [PeerWatch(r, 2, 0.2, store=store, exit_process=exits[r]) for r in range(2)]
    for watch in watches:
        watch.start()
    time.sleep(0.3)  # more than a timeout of answering ranks
    for watch in watches:
        watch.stop()
    time.sleep(0.3)  # and a timeout after the stop
    assert [e.statuses for e in exits] == [[], []]


def test_a_collective_whose_peer_went_away_is_one_line_and_other_errors_are_not_rewritten():
    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[10.0.0.7]:41234: Connection reset by peer. This is typically caused by a remote worker "
        "hanging or bugs in the application. Check the logs of the remote worker before "
        "reporting an error. GLHF!"
    )
    assert lost_peer_message(gloo) == (
        "a collective failed (Read error [10.0.0.7]:41234: Connection reset by peer): a rank of "
        "this run or its node died or is cut off"
    )
    assert lost_peer_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer_message(RuntimeError("DataLoader timed out after 5 seconds")) is None
    assert lost_peer_message(dist.DistNetworkError("Connection reset by peer")) is not None
    assert lost_peer_message(ValueError("Connection reset by peer")) is None
