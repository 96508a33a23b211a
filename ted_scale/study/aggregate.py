"""Mean +- standard deviation per row, and paired differences against TED over common seeds with
a 95 % Student-t interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

# t_{0.975, df} of Student's t for df = 1..30 (scipy is not a dependency); beyond, the
# Cornish-Fisher expansion in ``t_quantile_975`` is within 2e-6 of it.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """{"mean", "std", "n"}: the sample standard deviation (n - 1), None below two values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def paired_difference(
    row: Mapping[int, float], reference: Mapping[int, float]
) -> dict[str, float | int | list[int] | None]:
    """row - reference per seed both have, summarized: {"mean", "std", "n", "seeds", "ci95",
    "distinguishable"}.

    ci95 is mean -+ t_{0.975, n-1} * std / sqrt(n), the 95 % interval of the mean paired
    difference over seeds (None below two seeds); ``distinguishable`` is False when it contains
    0 (the seeds cannot tell the two rows apart), None without an interval. For perplexities a
    positive mean says the reference (TED) is lower, i.e. better.
    """
    seeds = sorted(set(row) & set(reference))
    diffs = [row[s] - reference[s] for s in seeds]
    stats = summarize(diffs)
    ci95, distinguishable = None, None
    if stats["std"] is not None:
        half = t_quantile_975(len(diffs) - 1) * stats["std"] / math.sqrt(len(diffs))
        ci95 = [stats["mean"] - half, stats["mean"] + half]
        distinguishable = not ci95[0] <= 0.0 <= ci95[1]
    return {**stats, "seeds": seeds, "ci95": ci95, "distinguishable": distinguishable}


def metric_by_seed(runs: Mapping[int, dict], path: tuple[str, ...]) -> dict[int, float]:
    """{seed: value} of the metric at `path` (e.g. ("heldout", "perplexity")) of each run's eval."""
    out = {}
    for seed, done in runs.items():
        value = done.get("eval", {})
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[seed] = float(value)
    return out
