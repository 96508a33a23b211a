"""Which teacher layer each student layer is matched with."""

from __future__ import annotations

from collections.abc import Sequence


def paper_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """The paper's map as 0-based teacher blocks, one per student block.

    Student layer k (1-based) is matched with teacher layer M(k) = 2k-1 for k <= K/2 and 2k for
    k > K/2; for 12 -> 6 that is blocks 0, 2, 4, 7, 9, 11 (the ones DistilGPT-2 copies). For other
    depth ratios r = L/K the same rule reads M(k) = round(r*k) - 1 for k <= K/2 and round(r*k)
    above, with no offset when r < 1.5 (so L = K maps every layer to itself).
    """
    if not 0 < n_student <= n_teacher:
        raise ValueError(f"cannot map {n_student} student layers onto {n_teacher} teacher layers")
    ratio = n_teacher / n_student
    offset = 1 if ratio >= 1.5 else 0
    one_based = [
        max(round(ratio * k) - (offset if k <= n_student / 2 else 0), 1)
        for k in range(1, n_student + 1)
    ]
    return [m - 1 for m in one_based]


def resolve_layer_map(explicit: Sequence[int] | None, n_teacher: int, n_student: int) -> list[int]:
    """``explicit`` checked against both depths, or the paper's map when it is None."""
    if explicit is None:
        return paper_layer_map(n_teacher, n_student)
    layer_map = list(explicit)
    if len(layer_map) != n_student:
        raise ValueError(
            f"layer map {layer_map} has {len(layer_map)} entries for {n_student} student layers"
        )
    bad = [b for b in layer_map if not 0 <= b < n_teacher]
    if bad:
        raise ValueError(
            f"layer map {layer_map} points at teacher blocks {bad}, but the teacher has blocks "
            f"0..{n_teacher - 1} only"
        )
    return layer_map
