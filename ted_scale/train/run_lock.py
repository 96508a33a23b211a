"""One run per run directory: ``output_dir/.lock`` names the holder's host and pid.

The lock is an ``flock`` held for the life of the process, so the kernel releases it when the
holder dies, kill -9 included: a lock file left by a dead run is simply taken over (and said so).
A run that ends, by success or by an error, removes the file.
The host and pid inside the file are for the message a second invocation prints.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
# Locks this process holds, by path: a later RunLock on the same directory in the same process
# (a Trainer built after an earlier one that failed) takes the descriptor over instead of
# deadlocking against itself.
_HELD: dict[Path, int] = {}


class RunLockedError(RuntimeError):
    """Another live process holds this run directory."""


class RunLock:
    """An exclusive lock on a run directory; ``release`` (or process exit) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict | None = None
        """The holder recorded in a lock file left by a dead process, if one was taken over."""

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the live holder."""
        key = self.path.resolve()
        if key in _HELD:
            self._fd = _HELD[key]
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} "
                    f"on host {holder.get('host', '?')}, since {holder.get('started', '?')}; "
                    f"lock file {self.path}): wait for it to end or use another output_dir"
                ) from None
            # A holder that released between our open and flock may have unlinked the file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        self.previous = previous or None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = _HELD[key] = fd
        # Any exit but a kill (errors included) removes the file: one left behind means a crash.
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if _HELD.pop(self.path.resolve(), None) != self._fd:
            self._fd = None  # another RunLock of this process took it over
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        atexit.unregister(self.release)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(data) if data.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
