"""The paper's Table 1 as Markdown: one row per model, zero-shot and after-transfer columns, the
method study's mean ± std beside them when its results are given, and a line per column saying
what it is. A column no model has a value for is left out (and said so), never printed empty."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ted_scale.eval import EvalError

MISSING = "–"
STUDY_ABSENT = "study results not present (run `make study`)"


@dataclass(frozen=True)
class Column:
    title: str
    task: str  # key of an `evaluate.py` results file
    metric: str
    is_accuracy: bool
    study_key: str  # the same metric's key in the study's results.json (ted_scale/study/results.py)
    meaning: str


COLUMNS = (
    Column(
        "held-out ppl",
        "heldout",
        "perplexity",
        False,
        "heldout_ppl",
        "token perplexity on the held-out split of the training corpus (in domain)",
    ),
    Column(
        "WikiText ppl",
        "wikitext",
        "word_perplexity",
        False,
        "wikitext_word_ppl",
        "word perplexity on the WikiText-2 test set (the paper's metric; protocol below)",
    ),
    Column(
        "LAMBADA ppl",
        "lambada",
        "perplexity",
        False,
        "lambada_ppl",
        "perplexity of the last word of each LAMBADA passage",
    ),
    Column(
        "LAMBADA acc (%)",
        "lambada",
        "accuracy",
        True,
        "lambada_acc",
        "share of LAMBADA passages whose last word the model predicts exactly",
    ),
)


def load_results(path: str | os.PathLike) -> dict:
    """An `evaluate.py` results file (EvalError naming the file if missing or malformed)."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{path}: no such results file") from None
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: not a JSON results file ({e})") from None
    if not isinstance(results, dict):
        raise EvalError(f"{path}: expected a JSON object of task results")
    return results


def load_study(path: str | os.PathLike) -> dict | None:
    """The study's `results.json` (ted_scale/study/results.py), or None when the file is absent.

    EvalError naming the file when it is there but is not a study's results.
    """
    if not Path(path).is_file():
        return None
    study = load_results(path)
    if not isinstance(study.get("teacher"), dict) or not isinstance(study.get("rows"), list):
        raise EvalError(f"{path}: not a study results file (no 'teacher' object or 'rows' list)")
    return study


def _value(results: dict | None, task: str, metric: str) -> float | None:
    value = (results or {}).get(task, {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return float(value)


def _fmt(value: float | None, is_accuracy: bool) -> str:
    if value is None:
        return MISSING
    return f"{100 * value:.2f}" if is_accuracy else f"{value:.2f}"


def row_key(name: str) -> str:
    """A table name as a study row name: `CR-ILD` -> `cr_ild`, `TED` -> `ted`."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _study_cell(study: dict, row: str, col: Column) -> str:
    entry = (
        study["teacher"]
        if row == "teacher"
        else next((r for r in study["rows"] if isinstance(r, dict) and r.get("name") == row), {})
    )
    stat = entry.get(col.study_key)
    mean = stat.get("mean") if isinstance(stat, dict) else None
    if not isinstance(mean, (int, float)):
        return MISSING
    std, n = stat.get("std"), stat.get("n")
    seeds = len(study.get("study", {}).get("seeds", []))
    scale = 100 if col.is_accuracy else 1
    cell = f"{scale * mean:.2f}" + (
        f" ± {scale * std:.2f}" if isinstance(std, (int, float)) else ""
    )
    return cell + (f" ({n} of {seeds} seeds)" if row != "teacher" and n != seeds else "")


def _unsolved(names: list[str], values: dict[Column, list[float | None]], results: dict) -> dict:
    """Tasks with an accuracy that no model scored on them gets above zero -> why they are left
    out (every model misses every answer, so their perplexities would compare nothing)."""
    out = {}
    for col, vals in values.items():
        scored = [n for n, v in zip(names, vals, strict=True) if v is not None]
        if col.is_accuracy and scored and not any(v for v in vals if v is not None):
            counts = {results[n][col.task].get("num_examples") for n in scored} - {None}
            of = f" of its {counts.pop()} passages" if len(counts) == 1 else ""
            out[col.task] = (
                f"{col.title.split()[0]} left out: no model scored on it ({', '.join(scored)}) "
                f"predicts any answer{of}, so its perplexities would compare nothing"
            )
    return out


def _study_notes(study: dict, source: str, results: list[dict]) -> list[str]:
    """What the study columns are, and whether they scored the same text as `results`."""
    config = study.get("study", {})
    teacher_steps = config.get("teacher", {}).get("stage2", {}).get("max_steps", "?")
    student = config.get("student", {})
    s1 = student.get("stage1", {}).get("max_steps", "?")
    s2 = student.get("stage2", {}).get("max_steps", "?")
    seeds = config.get("seeds", [])
    corpus = config.get("corpus", {}).get("path", "?")
    lines = [
        f"study: mean ± std over seeds {seeds} of `make study` (`{source}`; the teacher: its one "
        f"run): corpus {corpus}, teacher {teacher_steps} steps, students {s1} Stage I + {s2} "
        "Stage II steps."
    ]
    same, differ = [], []
    for task, keys in (("heldout", ("num_tokens",)), ("wikitext", ("protocol", "source"))):
        ours = {
            tuple(r[task].get(k) for k in keys) for r in results if isinstance(r.get(task), dict)
        }
        theirs = study["teacher"].get("eval", {}).get(task, {})
        theirs = tuple(theirs.get(k) for k in keys) if isinstance(theirs, dict) else None
        if not ours or theirs is None:
            continue
        label = ", ".join(f"{k} {v}" for k, v in zip(keys, theirs, strict=True))
        if ours == {theirs}:
            same.append(f"{task} ({label})")
        else:
            mine = "; ".join(", ".join(map(str, o)) for o in sorted(ours, key=str))
            differ.append(f"{task}: here {mine}, study {label}")
    if same:
        lines.append(f"Scored like the study: {'; '.join(same)}.")
    if differ:
        lines.append(f"NOT scored like the study, so not comparable: {' / '.join(differ)}.")
    return lines


def _teacher_check(names: list[str], zero_shot: dict[str, dict]) -> list[str]:
    """Whether the row named "teacher" has the lowest held-out perplexity (a teacher that its
    students beat is under-trained for them, and the table says so)."""
    ppl = {n: _value(zero_shot.get(n), "heldout", "perplexity") for n in names}
    ppl = {n: v for n, v in ppl.items() if v is not None}
    if "teacher" not in ppl or len(ppl) < 2:
        return []
    beaten = [f"{n} ({v:.2f})" for n, v in ppl.items() if n != "teacher" and v <= ppl["teacher"]]
    if not beaten:
        return ["Teacher better than every other row on held-out ppl: yes."]
    return [
        f"Teacher better than every other row on held-out ppl: NO, {', '.join(beaten)} at or "
        f"below its {ppl['teacher']:.2f}: the teacher is under-trained for its students' budget."
    ]


def table1(
    zero_shot: dict[str, dict],
    transfer: dict[str, dict] | None = None,
    *,
    study: dict | None = None,
    study_source: str | None = None,
    study_rows: dict[str, str] | None = None,
    notes: list[str] | tuple[str, ...] = (),
) -> str:
    """Markdown table, then one line per column and the notes. Rows: the names of `zero_shot`,
    then any only in `transfer`, in order.

    zero_shot / transfer: name -> results dict (as written by `launch/evaluate.py`).
    study: the study's results.json (`load_study`), read from `study_source`; with a source but no
    study, a line says the study results are not present. Each zero-shot column then gets a
    "study" column beside it: the mean ± std of the study row `study_rows.get(name, row_key(name))`.
    A column with no value, and a task whose accuracy is zero for every model, are left out.
    """
    transfer = transfer or {}
    names = list(dict.fromkeys([*zero_shot, *transfer]))
    study_rows = study_rows or {}
    columns: list[tuple[str, list[str], str]] = []  # (title, cells, what it is)
    left_out: list[str] = []
    why: list[str] = []
    both = bool(zero_shot) and bool(transfer)  # say which setting a column is only if there are two
    for setting, results in (("zero-shot", zero_shot), ("transfer", transfer)):
        if not results:
            continue
        values = {
            col: [_value(results.get(n), col.task, col.metric) for n in names] for col in COLUMNS
        }
        unsolved = _unsolved(names, values, results)
        why += [f"{line}{f' ({setting})' if both else ''}." for line in unsolved.values()]
        for col in COLUMNS:
            title = f"{col.title} ({setting})" if both else col.title
            if col.task in unsolved:
                continue
            if all(v is None for v in values[col]):
                left_out.append(f"{title} (no model has it)")
                continue
            what = col.meaning + ("" if setting == "zero-shot" else ", after transfer")
            columns.append((title, [_fmt(v, col.is_accuracy) for v in values[col]], what))
            if setting == "zero-shot" and study is not None:
                cells = [_study_cell(study, study_rows.get(n, row_key(n)), col) for n in names]
                if any(c != MISSING for c in cells):
                    what = "the same in `make study`: mean ± std over its seeds (below)"
                    columns.append((f"{col.title}: study", cells, what))
    header = ["Model", *(title for title, _, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    for i, name in enumerate(names):
        lines.append("| " + " | ".join([name, *(cells[i] for _, cells, _ in columns)]) + " |")
    below = [f"{title}: {what}." for title, _, what in columns]
    if any(title.startswith("WikiText") for title, _, _ in columns):
        below += wikitext_notes([*zero_shot.values(), *transfer.values()])
    below += _teacher_check(names, zero_shot)
    below += why
    if left_out:
        below.append(f"Left out: {'; '.join(left_out)}.")
    if study is not None:
        below += _study_notes(study, study_source or "study results", list(zero_shot.values()))
    elif study_source is not None:
        below.append(f"{STUDY_ABSENT[0].upper()}{STUDY_ABSENT[1:]}: no `{study_source}`.")
    below += list(notes)
    return "\n".join(lines) + "\n\n" + "".join(f"- {line}\n" for line in below)


def wikitext_notes(results: list[dict]) -> list[str]:
    """One line per distinct WikiText (protocol, source) among `results`, saying what was scored.

    Word perplexities from different protocols or sources are not comparable (the tokenised
    release's `<unk>` and the per-article vs stream windows move them by percents).
    """
    seen = dict.fromkeys(
        (r["wikitext"].get("protocol", "not recorded"), r["wikitext"].get("source", "not recorded"))
        for r in results
        if isinstance(r.get("wikitext"), dict)
    )
    return [f"WikiText ppl: word perplexity; protocol {p}; source {s}." for p, s in seen]


def parse_named(items: list[str], flag: str) -> dict[str, str]:
    """["NAME=PATH", ...] -> {NAME: PATH}, keeping the order (EvalError on a malformed item)."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"{flag} {item!r}: expected NAME=PATH")
        if name in named:
            raise EvalError(f"{flag}: name {name!r} given twice")
        named[name] = path
    return named
