"""ted_scale.io: atomic directory replacement under kill -9, file modes, OS error messages."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ted_scale.io import (
    FAULT_ENV,
    atomic_replace_dir,
    atomic_write_text,
    links_leaving,
    os_error_message,
    replace_dir_leftovers,
)

# A writer that replaces DEST with N files holding VERSION; it can die at any fault point.
WRITER = """
import sys
from pathlib import Path
from ted_scale.io import atomic_replace_dir, fault_point
dest, version, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with atomic_replace_dir(dest) as tmp:
    for i in range(n):
        (tmp / f"part{i}.txt").write_text(version * 1000)
        if i == n // 2:
            fault_point("writer.half_filled")
"""


def _write(dest: Path, version: str, fault: str | None = None) -> int:
    env = {**os.environ, FAULT_ENV: fault or ""}
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(dest), version, "6"], env=env, timeout=60
    )
    return proc.returncode


def _versions(dest: Path) -> set[str]:
    """The versions the directory's files hold: one, if the directory is whole."""
    files = sorted(dest.iterdir())
    assert [p.name for p in files] == [f"part{i}.txt" for i in range(6)], files
    return {p.read_text()[0] for p in files}


@pytest.mark.parametrize(
    "fault", ["writer.half_filled", "replace_dir.filled", "replace_dir.swapped"]
)
def test_a_writer_killed_at_any_point_leaves_the_old_or_the_new_directory_whole(tmp_path, fault):
    dest = tmp_path / "export"
    assert _write(dest, "a") == 0 and _versions(dest) == {"a"}
    mine = tmp_path / "mine.txt"  # the user's own file beside the directory
    mine.write_text("keep me")

    assert _write(dest, "b", fault) == -9
    expected = {"b"} if fault == "replace_dir.swapped" else {"a"}
    assert _versions(dest) == expected
    leftovers = {p.name for p in tmp_path.iterdir()} - {"export", "mine.txt"}
    assert leftovers <= {p.name for p in replace_dir_leftovers(dest)}

    # The next run cleans what the killed one left, and only that.
    assert _write(dest, "c") == 0
    assert _versions(dest) == {"c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine.txt"]
    assert mine.read_text() == "keep me"


def test_a_failing_writer_leaves_the_old_directory_and_no_temporary(tmp_path):
    dest = tmp_path / "d"
    with atomic_replace_dir(dest) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_replace_dir(dest) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError("writer failed")
    assert (dest / "x").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_files_are_created_with_the_users_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.json", "{}")
        with atomic_replace_dir(tmp_path / "dir") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o755


def test_writing_under_a_file_names_the_path_and_the_errno_meaning(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    with pytest.raises(OSError) as info:
        atomic_write_text(blocker / "manifest.json", "{}")
    assert os_error_message(info.value) == f"{blocker}: File exists (EEXIST: a file is in the way)"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x.bin")
    assert os_error_message(full) == (
        "/data/x.bin: No space left on device (ENOSPC: the disk is full)"
    )
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x")
    assert "EROFS: the filesystem is mounted read-only" in os_error_message(ro)


def test_a_full_disk_while_writing_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write/fsync raise it: no path

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "results.json", "{}")
    message = os_error_message(info.value)
    assert (
        message
        == f"{tmp_path / 'results.json'}: No space left on device (ENOSPC: the disk is full)"
    )
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_a_directory_that_is_a_link_is_not_replaced_and_its_target_is_untouched(tmp_path):
    user = tmp_path / "user_folder"
    user.mkdir()
    (user / "mine.txt").write_text("keep")
    dest = tmp_path / "run" / "student_hf"
    dest.parent.mkdir()
    dest.symlink_to(user)
    with (
        pytest.raises(OSError, match=rf"{dest} is a symbolic link \(to {user}\)"),
        atomic_replace_dir(dest) as tmp,
    ):
        (tmp / "model.safetensors").write_bytes(b"x")
    assert [p.name for p in user.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["student_hf"]  # no .tmp left


def test_links_leaving_a_directory_are_found_and_links_inside_it_are_not(tmp_path):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "here").symlink_to(root / "inner")
    (root / "away").symlink_to(tmp_path)
    assert links_leaving(root) == [root / "away"]
