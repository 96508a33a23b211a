"""The paper's Table 1 as Markdown: one row per model, zero-shot and after-transfer columns."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ted_scale.eval import EvalError

# (column title, task, metric, is_accuracy), repeated for zero-shot and after transfer.
COLUMNS = (
    ("held-out ppl", "heldout", "perplexity", False),
    ("WikiText ppl", "wikitext", "word_perplexity", False),
    ("LAMBADA ppl", "lambada", "perplexity", False),
    ("LAMBADA acc (%)", "lambada", "accuracy", True),
)
MISSING = "–"


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


def _cell(results: dict | None, task: str, metric: str, is_accuracy: bool) -> str:
    value = (results or {}).get(task, {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return MISSING
    return f"{100 * value:.2f}" if is_accuracy else f"{value:.2f}"


def table1(zero_shot: dict[str, dict], transfer: dict[str, dict] | None = None) -> str:
    """Markdown table. Rows: the names of `zero_shot`, then any only in `transfer`, in order.

    zero_shot / transfer: name -> results dict (as written by `launch/evaluate.py`).
    WikiText ppl is word-level (the paper's metric); missing values are shown as "–".
    """
    transfer = transfer or {}
    names = list(dict.fromkeys([*zero_shot, *transfer]))
    header = ["Model"] + [f"{title} (zero-shot)" for title, *_ in COLUMNS]
    header += [f"{title} (transfer)" for title, *_ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name in names:
        cells = [_cell(zero_shot.get(name), *col[1:]) for col in COLUMNS]
        cells += [_cell(transfer.get(name), *col[1:]) for col in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    notes = wikitext_notes([*zero_shot.values(), *transfer.values()])
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


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
