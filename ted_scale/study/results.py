"""The study's `results.json`, `results.md` and figures, from the finished runs on disk."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ted_scale.config import to_dict
from ted_scale.eval.plots import plot_runs, read_metrics
from ted_scale.io import atomic_write_json, atomic_write_text
from ted_scale.study.aggregate import metric_by_seed, paired_difference, summarize
from ted_scale.study.config import StudyConfig
from ted_scale.study.plan import Row, StudyPaths, is_done, read_done, rows

REFERENCE = "ted"
METRICS = (  # (column, key in results.json, path in an evaluate.py result)
    ("held-out ppl", "heldout_ppl", ("heldout", "perplexity")),
    ("WikiText-2 token ppl", "wikitext_token_ppl", ("wikitext", "token_perplexity")),
    ("WikiText-2 word ppl", "wikitext_word_ppl", ("wikitext", "word_perplexity")),
)
LAMBADA_METRICS = (
    ("LAMBADA acc", "lambada_acc", ("lambada", "accuracy")),
    ("LAMBADA ppl", "lambada_ppl", ("lambada", "perplexity")),
)
PAIRED = ("heldout_ppl", "wikitext_token_ppl")


def _runs(paths: StudyPaths, row: Row, seeds: list[int]) -> dict[int, dict]:
    return {
        s: read_done(paths.run_dir(row.name, s))
        for s in seeds
        if is_done(paths.run_dir(row.name, s))
    }


def _flops(runs: dict[int, dict]) -> dict[str, float | None]:
    def mean(part: str) -> float | None:
        values = [r["flops"][part] for r in runs.values() if r["flops"].get(part) is not None]
        return sum(values) / len(values) if values else None

    stage1, stage2 = mean("stage1"), mean("stage2")
    total = None if stage2 is None else stage2 + (stage1 or 0.0)
    return {"stage1": stage1, "stage2": stage2, "total": total}


def row_result(
    paths: StudyPaths,
    row: Row,
    seeds: list[int],
    metrics: tuple,
    missing: dict[str, str],
    failures: dict[str, str],
) -> dict[str, Any]:
    """One row: status, per-seed values, mean +- std per metric, FLOPs."""
    runs = _runs(paths, row, seeds)
    out: dict[str, Any] = {"name": row.name, "method": row.method, "overrides": row.overrides}
    if row.name in missing:
        return {**out, "status": "not yet implemented", "reason": missing[row.name]}
    names = {paths.run_dir(row.name, s).name for s in seeds}
    failed = {k: v for k, v in failures.items() if k in names}
    status = "done" if len(runs) == len(seeds) else f"incomplete ({len(runs)}/{len(seeds)} seeds)"
    out |= {"status": status, "seeds": sorted(runs), "flops": _flops(runs)}
    if failed:
        out["failures"] = failed
    for _, key, path in metrics:
        by_seed = metric_by_seed(runs, path)
        out[key] = {"by_seed": by_seed, **summarize(list(by_seed.values()))}
    return out


def _budget(raw: dict[str, Any], stage: str) -> str:
    steps = raw.get(stage, {}).get("max_steps")
    batch = raw.get("batch", {}).get("global_batch_size")
    lr = raw.get(stage, {}).get("lr") or raw.get("optim", {}).get("lr")
    return f"{steps} steps of {batch} sequences, lr {lr}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "–"
    std = stat.get("std")
    return _fmt(stat["mean"]) + ("" if std is None else f" ± {_fmt(std)}")


def _sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


def _table(results: list[dict[str, Any]], metrics: tuple) -> list[str]:
    header = ["row", "seeds", *(m[0] for m in metrics), "Stage II FLOPs", "Stage I FLOPs"]
    header.append("total FLOPs")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in results:
        if r["status"] == "not yet implemented":
            cells = ["not yet implemented"] + ["–"] * (len(header) - 2)
        else:
            f = r["flops"]
            cells = [str(len(r["seeds"])), *(_cell(r[m[1]]) for m in metrics)]
            cells += [_sci(f["stage2"]), _sci(f["stage1"]), _sci(f["total"])]
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    return lines


def _paired_table(results: list[dict[str, Any]], ted: dict[str, Any]) -> list[str]:
    cols = [m for m in METRICS if m[1] in PAIRED]
    header = ["row - TED", *(f"{c[0]}: mean diff [95 % interval] (seeds)" for c in cols)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(cols)]
    for r in results:
        if r["name"] == REFERENCE or r["status"] == "not yet implemented":
            continue
        cells = []
        for _, key, _ in cols:
            d = paired_difference(r[key]["by_seed"], ted[key]["by_seed"])
            r.setdefault("paired_vs_ted", {})[key] = d
            cells.append(_paired_cell(d))
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    return lines


def _paired_cell(d: dict[str, Any]) -> str:
    """'+1.33 [+0.07, +2.60] (3)', with 'not distinguishable' when the interval contains 0."""
    if d["mean"] is None:
        return "–"
    cell = f"{d['mean']:+.2f}"
    if d["ci95"] is not None:
        lo, hi = d["ci95"]
        cell += f" [{lo:+.2f}, {hi:+.2f}]"
    cell += f" ({d['n']})"
    return cell + (": not distinguishable" if d["distinguishable"] is False else "")


def teacher_curve(paths: StudyPaths, out: Path) -> dict[str, Any]:
    """Plot the teacher's training loss and held-out perplexity; say how flat its end is."""
    records = [r for r in read_metrics(paths.teacher / "metrics.jsonl") if r.get("stage") == "lm"]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    heldout = [(r["step"], r["eval_heldout_ppl"]) for r in records if "eval_heldout_ppl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(*zip(*loss, strict=True))
    axes[0].set(xlabel="step", ylabel="training loss (CE)", title="Teacher: training loss")
    if heldout:
        axes[1].plot(*zip(*heldout, strict=True), marker="o")
    axes[1].set(xlabel="step", ylabel="held-out perplexity", title="Teacher: held-out perplexity")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    curve: dict[str, Any] = {"loss": loss, "heldout_ppl": heldout, "figure": str(out)}
    if len(heldout) >= 3:
        tail = heldout[-max(2, len(heldout) // 5) :]  # the last fifth of the evaluations
        curve["last_fifth_change"] = tail[-1][1] / tail[0][1] - 1
        curve["last_fifth_steps"] = [tail[0][0], tail[-1][0]]
    return curve


def write_report(study: StudyConfig, outcome: dict[str, Any], wall_seconds: float) -> Path:
    """Write results.json, results.md and figures under `study.output_dir`; return results.md."""
    paths = StudyPaths(Path(study.output_dir))
    teacher = read_done(paths.teacher)
    lambada = outcome["lambada_included"]
    metrics = METRICS + (LAMBADA_METRICS if lambada else ())
    all_rows = rows(study)
    results = [
        row_result(paths, r, study.seeds, metrics, outcome["missing"], outcome["failures"])
        for r in all_rows
    ]
    main = [r for r, row in zip(results, all_rows, strict=True) if not row.sweep]
    sweep = [r for r, row in zip(results, all_rows, strict=True) if row.sweep]
    ted = next(r for r in results if r["name"] == REFERENCE)

    figures = {"teacher_curve": str(paths.figures / "teacher_curve.png")}
    curve = teacher_curve(paths, paths.figures / "teacher_curve.png")
    first = study.seeds[0]
    fig2 = {n: paths.run_dir(n, first) for n in ("lwd", "ted")}
    if all(is_done(d) for d in fig2.values()):
        written = plot_runs({n.upper(): d for n, d in fig2.items()}, paths.figures / "fig2")
        figures |= {f"fig2_{p.stem}": str(p) for p in written}

    teacher_row = {"name": "teacher", "flops": {"stage2": teacher["flops"]["stage2"]}}
    for _, key, path in metrics:
        value = metric_by_seed({0: teacher}, path).get(0)
        teacher_row[key] = {"mean": value, "std": None, "n": 1}
    students = [r["heldout_ppl"]["mean"] for r in results if r.get("heldout_ppl", {}).get("mean")]
    teacher_best = bool(students) and teacher_row["heldout_ppl"]["mean"] < min(students)

    wikitext = teacher["eval"].get("wikitext", {})
    md = [
        "# Method study",
        "",
        f"Corpus `{study.corpus.path}` (BPE {study.corpus.vocab_size}, {study.corpus.seq_len}-"
        f"token samples, {100 * study.corpus.test_fraction:.0f} % of chapters held out); "
        f"seeds {study.seeds}. Every student row starts from the teacher's blocks at the "
        f"paper's layer map and has the same Stage II budget: {_budget(study.student, 'stage2')}; "
        f"Stage I adds {_budget(study.student, 'stage1')} (a method's own phases before Stage "
        "II may add more: see the Stage I FLOPs column).",
        "",
        "| model | held-out ppl | WikiText-2 token ppl | WikiText-2 word ppl | pre-training FLOPs |",
        "|---|---:|---:|---:|---:|",
        f"| teacher | {_fmt(teacher_row['heldout_ppl']['mean'])} | "
        f"{_fmt(teacher_row['wikitext_token_ppl']['mean'])} | "
        f"{_fmt(teacher_row['wikitext_word_ppl']['mean'])} | "
        f"{_sci(teacher['flops']['stage2'])} |",
        "",
        f"Teacher better than every student row on held-out perplexity: "
        f"{'yes' if teacher_best else 'NO'}.",
    ]
    if "last_fifth_change" in curve:
        a, b = curve["last_fifth_steps"]
        md.append(
            f"Teacher convergence: held-out perplexity changed by "
            f"{100 * curve['last_fifth_change']:+.1f} % between steps {a} and {b} "
            f"(curve: `{figures['teacher_curve']}`)."
        )
    md += ["", "## Rows (mean ± std over seeds)", "", *_table(main, metrics), ""]
    md += [
        "FLOPs are training FLOPs per run (the trainer's count): Stage II (or CE training) for "
        "every row; \"Stage I\" is every phase a method trains before it (TED's and TED-KL's "
        "filters, CR-ILD's ILD phase, MiniDisc's sandwich and its final hop's filters), counted "
        "in the total. The teacher's pre-training is shared by all rows and not counted.",
        "",
        "## Paired comparison with TED (row - TED per seed; positive: TED lower, i.e. better)",
        "",
        *_paired_table(results, ted),
        "",
        "Each interval is the 95 % Student-t interval of the mean paired difference over the "
        "seeds both rows finished, mean ± t(0.975, n - 1) · std / √n; a seed changes the data "
        "order, every dropout mask and every random initialisation (filters, projections, fit "
        "layers, mixup draws). A difference whose interval contains 0 is not distinguishable "
        "from run-to-run variation at these seeds.",
        "",
    ]
    if sweep:
        md += ["## TED sensitivity", "", *_table([ted, *sweep], metrics), ""]
    md += [
        "## Notes",
        "",
        f"- WikiText-2 test: protocol {wikitext.get('protocol', '–')}, source "
        f"{wikitext.get('source', '–')}; out of domain for a model trained on the study corpus, "
        "and scored with the study's own tokenizer (not comparable with GPT-2 numbers).",
        f"- {outcome['lambada']}",
    ]
    for r in results:
        if r["status"] == "not yet implemented":
            md.append(
                f"- {r['name']}: not yet implemented by the installed trainer ({r['reason']})."
            )
        elif r["status"] != "done":
            md.append(f"- {r['name']}: {r['status']}; failures: {r.get('failures', {})}.")
    md.append(f"- Figures: {', '.join(f'`{p}`' for p in figures.values())}.")
    done = [teacher] + [
        read_done(paths.run_dir(r.name, s))
        for r in all_rows
        for s in study.seeds
        if is_done(paths.run_dir(r.name, s))
    ]
    run_seconds = sum(d.get("train_seconds", 0) + d.get("eval_seconds", 0) for d in done)
    md.append(
        f"- Machine: {os.cpu_count()} CPU cores, {platform.platform()}; this invocation took "
        f"{wall_seconds / 60:.1f} min; the finished runs took {run_seconds / 60:.1f} min of "
        f"training and evaluation in all ({study.workers} at a time)."
    )
    out_md = paths.root / "results.md"
    atomic_write_text(out_md, "\n".join(md) + "\n")
    atomic_write_json(
        paths.root / "results.json",
        {
            "study": to_dict(study),
            "teacher": {**teacher_row, "eval": teacher["eval"], "curve": curve},
            "teacher_better_than_every_student": teacher_best,
            "rows": main,
            "sweep": sweep,
            "wikitext": {k: wikitext.get(k) for k in ("protocol", "source")},
            "lambada": {"included": lambada, "note": outcome["lambada"]},
            "figures": figures,
            "wall_seconds": round(wall_seconds, 1),
            "run_seconds": round(run_seconds, 1),
        },
    )
    return out_md
