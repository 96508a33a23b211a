"""A command's life tied to its parent's, and its last word handed to its launcher
(docs/design.md, "Reliability"). Free of torch: every command line imports it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1

DIE_WITH_PARENT = "TED_SCALE_DIE_WITH_PARENT"
"""Set in a command's environment by a parent (the study) that its commands die with: the
parent's pid."""


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel kill this process when its parent dies (kill -9 included).

    torchrun and deepspeed start each rank in its own session, so a killed launcher would leave
    its ranks training to the end, holding the run lock; so would a killed study its runs.
    ``parent``: the pid this process was started by, where the parent told it (a process whose
    parent died before this call has been handed to another already); by default its parent now.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    if parent is None:
        parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def tell_launcher(message: str) -> None:
    """Hand a rank's error line to torchrun, which prints it in its failure summary in place of
    "To enable traceback see: ..." (``TORCHELASTIC_ERROR_FILE``, set by torchrun per rank)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        # The error line on stderr is what matters: a failed write here is not reported.
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
