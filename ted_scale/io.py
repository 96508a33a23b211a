"""Atomic writes: readers see either the old file (or directory) or the complete new one, never a
prefix; files are created with the user's umask; OS errors are told as one line."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Test hook: SIGKILL this process when it reaches the fault point of this name (see fault_point).
FAULT_ENV = "TED_SCALE_FAULT"


def fault_point(name: str) -> None:
    """Die here, as a kill -9 would, when ``$TED_SCALE_FAULT`` is ``name`` (crash tests only)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync and rename.

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's
    0600, so a shared data or run directory stays readable by the group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file being written, not the random temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # write and fsync errors (ENOSPC) carry no path: name the file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable (a crash after return must not lose the file).
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 `text` to `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (byte-stable for equal objects)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- directories
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux renameat2); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # this filesystem cannot exchange
    raise OSError(err, os.strerror(err), str(b))


def replace_dir_leftovers(dest: str | os.PathLike) -> tuple[Path, Path]:
    """The two names :func:`atomic_replace_dir` may leave beside ``dest`` after a crash."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


@contextlib.contextmanager
def atomic_replace_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory to fill; on a clean exit it replaces ``dest`` in one step.

    A reader of ``dest`` sees the old directory or the new one, whole, never a mix. A crash
    (kill -9 included) at any point leaves ``dest`` old or new, plus at most the two hidden
    names of :func:`replace_dir_leftovers`, which the next call removes (and nothing else).
    The swap is a Linux ``renameat2(RENAME_EXCHANGE)``; on a filesystem without it, the old
    directory is moved aside first, and a crash in that instant is repaired by the next call.
    """
    dest = Path(dest)
    tmp, old = replace_dir_leftovers(dest)
    for path in (dest, tmp, old):
        if path.is_symlink():  # replacing it would move the link, and its target stays the user's
            raise OSError(
                f"{path} is a symbolic link (to {os.readlink(path)}): it is not replaced through "
                "links; remove the link (its target is left as it is) or write elsewhere"
            )
    if old.exists() and not dest.exists():
        os.rename(old, dest)  # the fallback swap was cut between its two renames
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        fault_point("replace_dir.filled")
        _fsync_tree(tmp)
        if not dest.exists():
            os.rename(tmp, dest)
        elif _exchange(tmp, dest):
            fault_point("replace_dir.swapped")
            shutil.rmtree(tmp)  # now the old directory
        else:
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def links_leaving(root: str | os.PathLike) -> list[Path]:
    """The entries of directory ``root`` that are symbolic links to somewhere outside it: writing
    there would write into another folder (a user's), so writers refuse them by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    inside = root.resolve()
    return sorted(
        p for p in root.iterdir() if p.is_symlink() and not p.resolve().is_relative_to(inside)
    )


# --------------------------------------------------------------------------- messages
_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the filesystem is mounted read-only",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file is in the way",
}


def os_error_message(e: OSError) -> str:
    """One line naming the path, the errno's meaning and its symbol: ``path: No space left on
    device (ENOSPC: the disk is full)``."""
    if e.errno is None:  # raised by this project with its own message
        return str(e)
    code = errno.errorcode.get(e.errno, "")
    hint = _HINTS.get(e.errno)
    detail = f"{code}: {hint}" if hint else code
    where = e.filename if e.filename is not None else "(no path)"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    meaning = e.strerror or str(e)
    return f"{where}: {meaning}" + (f" ({detail})" if detail else "")


class DamagedFileError(ValueError):
    """A file the project wrote is truncated or is not what its name says."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated file, or another format under the
    name (a pickle renamed ``.safetensors``), is refused naming it. Never unpickles."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, ValueError) as e:
        raise DamagedFileError(f"{path}: truncated or not a safetensors file ({e})") from None
