"""Figure 2 of the paper from runs' `metrics.jsonl`: training loss and per-layer losses vs step."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from ted_scale.eval import EvalError

METRICS_FILE = "metrics.jsonl"
# Figure groups: output file -> per-layer metric key pattern (Stage II layer loss, Stage I filters).
LAYER_PLOTS = {
    "layer_loss.png": re.compile(r"loss_layer_(\d+)"),
    "filter_loss.png": re.compile(r"loss_filter_(\d+)"),
}
EVAL_KEYS = {"eval_heldout_ppl": "held-out perplexity", "eval_lambada_acc": "LAMBADA accuracy"}
# Figure 2's training loss is that of the student, whichever method named its phases; a phase that
# trains filters (it reports ``loss_filter_k``: Stage I) sums losses on another scale, and gets
# its own per-filter figure instead.
FILTER_PART = "loss_filter_"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a metrics.jsonl (EvalError naming file and line when malformed)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise EvalError(f"{path}:{lineno}: not a JSON object ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise EvalError(f"{path}:{lineno}: expected an object with an integer 'step'")
                records.append(record)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such metrics file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: unreadable ({e})") from None
    return records


def _series(
    records: list[dict], key: str, student_only: bool = False
) -> dict[str, tuple[list[int], list[float]]]:
    """stage -> (steps, values) of `key`, skipping non-finite values; with `student_only`, without
    the stages that train filters."""
    filters = {r.get("stage") for r in records if any(k.startswith(FILTER_PART) for k in r)}
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if student_only and r.get("stage") in filters:
            continue
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps, values = out.setdefault(str(r.get("stage", "")), ([], []))
            steps.append(r["step"])
            values.append(float(value))
    return out


def _plot_lines(ax, runs: dict[str, list[dict]], key: str, student_only: bool = False) -> bool:
    """One line per (run, stage) of `key`; the stage is named only when a run has several."""
    drew = False
    for name, records in runs.items():
        series = _series(records, key, student_only)
        for stage, (steps, values) in series.items():
            ax.plot(steps, values, label=name if len(series) == 1 else f"{name} ({stage})")
            drew = True
    return drew


def plot_runs(runs: dict[str, str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Write Figure-2 style PNGs for runs {name: run_dir} into `out_dir`; return their paths.

    loss.png: the student's training loss (Stage II or LM training) vs step. layer_loss.png / filter_loss.png: one panel per student
    layer (Stage II `loss_layer_k`) / filter (Stage I `loss_filter_k`). eval.png: in-training
    evaluation, when logged. Figures without data in any run are skipped.
    """
    metrics = {name: read_metrics(Path(d) / METRICS_FILE) for name, d in runs.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, filename: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        written.append(out_dir / filename)

    fig, ax = plt.subplots(figsize=(6, 4))
    if _plot_lines(ax, metrics, "loss", student_only=True):
        ax.set(xlabel="step", ylabel="training loss", title="Student training loss")
        ax.legend()
        save(fig, "loss.png")
    plt.close(fig)

    keys = {k for records in metrics.values() for r in records for k in r}
    for filename, pattern in LAYER_PLOTS.items():
        layers = sorted(int(m.group(1)) for k in keys if (m := pattern.fullmatch(k)))
        if not layers:
            continue
        cols = min(3, len(layers))
        rows = -(-len(layers) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, layer in zip(axes.flat, layers, strict=False):
            _plot_lines(ax, metrics, pattern.pattern.replace(r"(\d+)", str(layer)))
            ax.set(xlabel="step", ylabel="loss", title=f"layer {layer}")
            ax.legend(fontsize="small")
        for ax in list(axes.flat)[len(layers) :]:
            ax.set_visible(False)
        save(fig, filename)
        plt.close(fig)

    present = [k for k in EVAL_KEYS if k in keys]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
        for ax, key in zip(axes.flat, present, strict=True):
            _plot_lines(ax, metrics, key)
            ax.set(xlabel="step", ylabel=EVAL_KEYS[key], title=EVAL_KEYS[key])
            ax.legend(fontsize="small")
        save(fig, "eval.png")
        plt.close(fig)
    if not written:
        raise EvalError(f"no plottable metrics in {', '.join(str(d) for d in runs.values())}")
    return written
