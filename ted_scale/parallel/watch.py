"""A rank that stops answering, found in bounded time and named (docs/multinode.md, "When a node
dies"; docs/design.md, "Across nodes").

A node that dies without closing its connections (power, kernel panic, a cut network, a frozen
host) leaves the other ranks waiting in their next collective until the process group's timeout:
30 minutes with gloo, 10 with NCCL. Here every rank bumps a counter in the launcher's rendezvous
store (``MASTER_ADDR:MASTER_PORT``) every few seconds from a daemon thread, and reads the counter
of the next rank (``rank + 1 mod world``); a second thread judges, because a store call can block
for good when the store's host freezes. A counter unchanged for ``timeout_s`` seconds (on this
rank's own monotonic clock: no clock has to agree across nodes) makes the judge publish a message
naming that rank, its host and pid; every rank reads it on its next beat, prints it, hands it to
the launcher and exits with status 1. A store that no longer answers for as long (the node that
holds it, rank 0's, is gone) ends the rank the same way. Three store operations per rank per
beat, whatever the world size.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from datetime import timedelta

from ted_scale.process import tell_launcher

LOST_STATUS = 1
"""The exit status of a rank stopped because another one was lost."""

RESUME_HINT = "relaunch every node with resume=auto: it continues from the last complete checkpoint"


class PeerWatch:
    """The heartbeat of rank ``rank`` and its watch over rank ``rank + 1``; ``start`` / ``stop``.

    ``store``: a ``torch.distributed.Store`` (by default a client of ``MASTER_ADDR:MASTER_PORT``);
    ``exit_process``: what ends the process (tests replace it)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        *,
        store=None,
        exit_process=os._exit,
    ) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = min(5.0, timeout_s / 4)
        self.watched = (rank + 1) % world_size
        self._exit = exit_process
        if store is None:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            self.store_name = f"{addr}:{port}"
            store = dist.TCPStore(
                addr,
                port,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        else:
            self.store_name = "the rendezvous store"
        # A torchrun restart reuses its agent's store: each attempt has keys of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"ted_scale/peers/{attempt}/", store)
        self.store.set(f"who/{rank}", f"host {socket.gethostname()}, pid {os.getpid()}")
        self._stop = threading.Event()
        self._published: str | None = None  # a loss another rank found
        self._store_error: str | None = None
        self._who: str | None = None  # the watched rank's host and pid
        self._seen: bytes | None = None
        self._answered = self._changed = time.monotonic()
        self._beater = threading.Thread(target=self._beat, name="ted_scale-beat", daemon=True)
        self._judge = threading.Thread(target=self._watch, name="ted_scale-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._beater.start()
        self._judge.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._judge.join()  # the beater may sit in a store call that never returns: a daemon

    def _beat(self) -> None:
        """Bump this rank's counter, read the watched rank's and any published loss; a store
        call can block for good when the store's host freezes, so ``_judge`` decides."""
        beat, key = 0, f"beat/{self.watched}"
        while not self._stop.is_set():
            beat += 1
            try:
                self.store.set(f"beat/{self.rank}", str(beat))
                if self.store.check(["lost"]):
                    self._published = self.store.get("lost").decode()
                    return
                value = self.store.get(key) if self.store.check([key]) else None
                if self._who is None and self.store.check([f"who/{self.watched}"]):
                    self._who = self.store.get(f"who/{self.watched}").decode()
            except Exception as e:  # the store's host is gone or refuses
                self._store_error = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                return
            now = time.monotonic()
            self._answered = now
            if value != self._seen:
                self._seen, self._changed = value, now
            self._stop.wait(self.interval_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if self._published is not None:
                return self._lost(self._published, publish=False)
            silent = now - self._answered
            if self._store_error is not None or silent > self.timeout_s:
                reason = self._store_error or f"no answer for {silent:.0f} s"
                return self._lost(
                    f"the rendezvous store at {self.store_name} stopped answering ({reason}): "
                    "the node that holds it (rank 0's, or its launcher's) died, hangs or is "
                    "cut off",
                    publish=False,
                )
            silent = now - self._changed
            if silent > self.timeout_s:
                return self._lost(
                    f"rank {self.watched} ({self._who or 'host unknown'}) has not answered for "
                    f"{silent:.0f} s (parallel.peer_timeout_s={self.timeout_s:g}): its node "
                    "died, hangs or is cut off"
                )

    def _publish(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set("lost", message)

    def _lost(self, message: str, publish: bool = True) -> None:
        if self._stop.is_set():
            return
        if publish:  # every rank stops with this message (or finds the rank, or loses the store)
            publisher = threading.Thread(target=self._publish, args=(message,), daemon=True)
            publisher.start()
            publisher.join(timeout=2.0)  # a store call may never return: not waited for longer
        line = f"ted_scale: error: rank {self.rank} stops: {message}; {RESUME_HINT}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        tell_launcher(line)
        self._exit(LOST_STATUS)


# Connection-level failures of gloo and NCCL: a peer gone, not a bug in what was sent.
_PEER_GONE = re.compile(
    r"Connection (?:reset|closed|refused)|Broken pipe|Socket Timeout|Timed out waiting|"
    r"timed out|NCCL communicator was aborted|remote process exited|Connection timed out",
    re.IGNORECASE,
)


def lost_peer_message(error: BaseException) -> str | None:
    """One line for an exception of a collective whose peer went away (``Connection reset by
    peer`` from gloo, a watchdog timeout from NCCL), or None for any other error. gloo names the
    peer's address, which is kept; its advice and emoji are not."""
    import torch.distributed as dist

    text = str(error).strip()
    from_collective = isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and re.search(r"gloo|nccl|c10d", text, re.IGNORECASE)
    )
    if not from_collective or not _PEER_GONE.search(text):
        return None
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp):\d+\] ", "", text.splitlines()[0])
    text = text.split(". This is typically caused by")[0]
    return f"a collective failed ({text}): a rank of this run or its node died or is cut off"
