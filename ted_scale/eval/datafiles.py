"""Reading the bundled evaluation files (`ted_scale/assets/`) and user-given copies."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

from ted_scale.eval import EvalError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def asset(name: str) -> Path:
    """Path of a bundled data file."""
    path = ASSETS / name
    if not path.is_file():
        raise EvalError(f"bundled data file {path} is missing (reinstall ted_scale)")
    return path


def asset_text(name: str, max_chars: int | None = None) -> str:
    """The text of a bundled gzip file (its first ``max_chars`` characters when given)."""
    with gzip.open(asset(name), "rt", encoding="utf-8") as f:
        return f.read(max_chars if max_chars is not None else -1)


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 text file, gzip if `*.gz`.

    A missing file or invalid UTF-8 raises EvalError naming the file (and line).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise EvalError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:  # unreadable, or a corrupt/truncated gzip stream
        raise EvalError(f"{path}: unreadable ({e})") from None
