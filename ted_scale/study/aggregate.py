"""Mean +- standard deviation per row, and paired differences against TED over common seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """{"mean", "std", "n"}: the sample standard deviation (n - 1), None below two values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def paired_difference(
    row: Mapping[int, float], reference: Mapping[int, float]
) -> dict[str, float | int | list[int] | None]:
    """row - reference per seed both have, summarized: {"mean", "std", "n", "seeds"}.

    For perplexities a positive mean says the reference (TED) is lower, i.e. better; a mean
    within about one std of zero says three seeds cannot tell the two apart.
    """
    seeds = sorted(set(row) & set(reference))
    diffs = [row[s] - reference[s] for s in seeds]
    return {**summarize(diffs), "seeds": seeds}


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
