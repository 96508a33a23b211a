"""Document sources: stream text documents from an HF dataset or local files, in a fixed order.

Local inputs are a file, a directory (searched recursively) or a glob; files are read in sorted
path order. Formats, by suffix:
- `.txt`: documents separated by blank lines (or one per line with `one_doc_per_line`);
- `.jsonl`: one JSON object per line, text under `text_field` (blank lines are not records);
- `.parquet`: column `text_field`.
Anything else is treated as an HF dataset name, loaded with `datasets.load_dataset`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ted_scale.data import DataError


@dataclass(frozen=True)
class SourceSpec:
    input: str
    text_field: str = "text"
    one_doc_per_line: bool = False
    skip_bad: bool = False
    hf_split: str = "train"
    hf_config: str | None = None
    streaming: bool = True


@dataclass
class SourceStats:
    """What happened to the input: every record read is either a document or counted here."""

    files: int = 0
    files_ignored: int = 0  # files in an input directory with an unsupported suffix
    documents: int = 0  # non-empty documents yielded
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0  # documents in which invalid UTF-8 was replaced by U+FFFD
    bad_records_skipped: int = 0  # with skip_bad: unparsable lines, missing or non-text fields


def iter_documents(spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    """Yield the non-empty documents of `spec.input`, updating `stats` as it goes.

    Raises DataError for unreadable input, for a bad record unless `spec.skip_bad`, and when the
    source turns out to hold no document at all.
    """
    files = resolve_files(spec.input, stats)
    raw = _iter_hf(spec, stats) if files is None else _iter_files(files, spec, stats)
    for text in raw:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from JSON "\udc80" escapes
            text = text.encode("utf-8", "replace").decode("utf-8")
            stats.invalid_utf8_replaced += 1
        if not text.strip():
            stats.empty_skipped += 1
            continue
        stats.documents += 1
        yield text
    if stats.documents == 0:
        raise DataError(
            f"no documents in {spec.input!r} ({stats.files} files, {stats.empty_skipped} empty "
            f"documents, {stats.bad_records_skipped} bad records skipped)"
        )


def input_fingerprint(spec: SourceSpec) -> dict[str, Any]:
    """What identifies the input without reading it: for local files, each one's resolved path,
    size and modification time (ns) in reading order; for an HF dataset, its name, configuration
    and split (the hub gives no cheap content identity)."""
    files = resolve_files(spec.input, SourceStats())
    if files is None:
        return {"hf_dataset": spec.input, "hf_config": spec.hf_config, "hf_split": spec.hf_split}
    entries = []
    for p in files:
        st = p.stat()
        entries.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return {"files": entries}


def fingerprint_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """None if equal, else a short account of the first differences between two fingerprints."""
    if old == new:
        return None
    if "files" not in old or "files" not in new:
        return f"input {old} -> {new}"
    before = {path: (size, mtime) for path, size, mtime in old["files"]}
    after = {path: (size, mtime) for path, size, mtime in new["files"]}
    notes = [f"{p} removed" for p in before if p not in after]
    notes += [f"{p} added" for p in after if p not in before]
    for p in before.keys() & after.keys():
        (s0, m0), (s1, m1) = before[p], after[p]
        if s0 != s1:
            notes.append(f"{p} size {s0} -> {s1} bytes")
        elif m0 != m1:
            notes.append(f"{p} modified since")
    if not notes:
        notes.append("file order changed")
    more = f" and {len(notes) - 3} more" if len(notes) > 3 else ""
    return "; ".join(sorted(notes)[:3]) + more


def resolve_files(input: str, stats: SourceStats) -> list[Path] | None:
    """The local files named by `input` (file, directory or glob), or None for an HF dataset."""
    path = Path(input)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        supported = [p for p in files if p.suffix in _READERS]
        stats.files_ignored = len(files) - len(supported)
        if not supported:
            raise DataError(f"{input}: no {'/'.join(_READERS)} files in this directory")
        return supported
    if path.is_file():
        files = [path]
    elif glob.has_magic(input):
        files = sorted(Path(p) for p in glob.glob(input, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{input}: the pattern matches no files")
    elif path.suffix in _READERS:
        raise DataError(f"{input}: no such file")
    else:
        return None
    for p in files:
        if p.suffix not in _READERS:
            raise DataError(f"{p}: unsupported file type (use {', '.join(_READERS)})")
    return files


def _iter_files(files: list[Path], spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    for path in files:
        stats.files += 1
        try:
            yield from _READERS[path.suffix](path, spec, stats)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def _decode(data: bytes, stats: SourceStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return data.decode("utf-8", "replace")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its \\n or \\r\\n terminator)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line.rstrip(b"\n").removesuffix(b"\r")


def _read_txt(path: Path, spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    if spec.one_doc_per_line:
        for _, line in _lines(path):
            yield _decode(line, stats)
        return
    block: list[bytes] = []
    for _, line in _lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield _decode(b"\n".join(block), stats)
            block = []
    if block:
        yield _decode(b"\n".join(block), stats)


def _bad_record(spec: SourceSpec, stats: SourceStats, where: str, reason: str) -> None:
    if not spec.skip_bad:
        raise DataError(f"{where}: {reason} (--skip-bad skips and counts such records)")
    stats.bad_records_skipped += 1


def _text_of(record: object, spec: SourceSpec, stats: SourceStats, where: str) -> str | None:
    """The text field of a parsed record, or None (after _bad_record) when it has none."""
    if not isinstance(record, dict):
        _bad_record(spec, stats, where, f"not a JSON object ({type(record).__name__})")
        return None
    if spec.text_field not in record:
        _bad_record(spec, stats, where, f"no field {spec.text_field!r}")
        return None
    value = record[spec.text_field]
    if isinstance(value, bytes):
        return _decode(value, stats)
    if not isinstance(value, str):
        _bad_record(spec, stats, where, f"field {spec.text_field!r} is {type(value).__name__}")
        return None
    return value


def _read_jsonl(path: Path, spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    import json

    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(_decode(line, stats))
        except ValueError as e:
            _bad_record(spec, stats, where, f"not JSON ({e})")
            continue
        text = _text_of(record, spec, stats, where)
        if text is not None:
            yield text


def _read_parquet(path: Path, spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if spec.text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {spec.text_field!r} (has {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[spec.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _text_of({spec.text_field: value}, spec, stats, f"{path}: row {row}")
            if text is not None:
                yield text


def _iter_hf(spec: SourceSpec, stats: SourceStats) -> Iterator[str]:
    import datasets

    name = f"HF dataset {spec.input!r} (split {spec.hf_split!r})"
    try:
        ds = datasets.load_dataset(
            spec.input, spec.hf_config, split=spec.hf_split, streaming=spec.streaming
        )
    except Exception as e:  # hub, network and builder errors come in many types
        raise DataError(f"cannot load {name}: {type(e).__name__}: {e}") from None
    stats.files += 1
    for row, record in enumerate(ds, 1):
        text = _text_of(record, spec, stats, f"{name} row {row}")
        if text is not None:
            yield text


_READERS: dict[str, Callable[[Path, SourceSpec, SourceStats], Iterator[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}
