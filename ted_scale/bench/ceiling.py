"""This CPU's fp32 matmul ceiling: the sustained GEMM rate at a step's own shapes and thread count.

The throughput benchmark divides each configuration's achieved FLOP/s by this rate ("CPU MFU"),
so a figure says how far the whole step is from what the machine's matrix units do on the same
matrices. Per shape, ``C = A @ B`` runs into a preallocated output (as the fused losses do) for a
short time budget after one warm-up call; its rate is the fastest call's (the least disturbed on a
shared machine, as the benchmark's own step times). The overall rate weights each shape by the
FLOPs the step spends on it: total FLOPs / total time at the per-shape rates.

A dimension is halved (largest first, not below ``MIN_DIM``) until one call is at most
``max_flops``: at these sizes the blocked GEMM's rate no longer depends on it, and the whole
measurement stays well under a few seconds even at the LM head's [B*T, d] x [d, V].
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_DIM = 1024


@dataclass(frozen=True)
class GemmShape:
    """[m, k] x [k, n], done ``count`` times per step (its weight in the overall rate)."""

    m: int
    k: int
    n: int
    count: int = 1
    name: str = ""

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def step_shapes(
    tokens: int, width: int, vocab: int, student_layers: int, teacher_layers: int = 0
) -> list[GemmShape]:
    """The matmuls of a distillation step (attention's own batched products aside).

    tokens: B*T rows. The student's LM head and blocks run forward and both backward products
    (grad input [N, n] x [n, k], grad weight [n, N] x [N, k] for a k -> n projection); the frozen teacher's forward only,
    its LM head included when ``teacher_layers`` > 0. Block projections: qkv d -> 3d, attention out
    d -> d, MLP d -> 4d and 4d -> d.
    """
    n, d = tokens, width
    shapes: dict[tuple[int, int, int], list] = {}

    def add(m: int, k: int, nn: int, count: int, name: str) -> None:
        entry = shapes.setdefault((m, k, nn), [0, name])
        entry[0] += count

    def linear(k: int, out: int, forward: int, backward: int, name: str) -> None:
        add(n, k, out, forward, name)
        add(n, out, k, backward, f"{name} grad input")
        add(out, n, k, backward, f"{name} grad weight")

    linear(d, vocab, 1 + (teacher_layers > 0), 1, "lm head")
    for k, out, name in ((d, 3 * d, "qkv"), (d, d, "attn out"), (d, 4 * d, "mlp up"),
                         (4 * d, d, "mlp down")):  # fmt: skip
        linear(k, out, student_layers + teacher_layers, student_layers, name)
    # Forward-only uses leave zero-count backward shapes behind: drop them.
    return [GemmShape(*mkn, count, name) for mkn, (count, name) in shapes.items() if count > 0]


def _measured_shape(shape: GemmShape, max_flops: int) -> tuple[int, int, int]:
    dims = [shape.m, shape.k, shape.n]
    while 2 * dims[0] * dims[1] * dims[2] > max_flops:
        i = max(range(3), key=lambda j: dims[j])
        if dims[i] // 2 < MIN_DIM:
            break
        dims[i] //= 2
    return dims[0], dims[1], dims[2]


@dataclass(frozen=True)
class Ceiling:
    threads: int
    gflops: float  # FLOP-weighted over the shapes
    shapes: list[dict]  # per shape: m, k, n, count, name, measured [m, k, n], gflops


def measure_ceiling(
    shapes: Sequence[GemmShape],
    *,
    seconds_per_shape: float = 0.05,
    max_flops: int = 2**29,
    min_calls: int = 3,
) -> Ceiling:
    """The sustained fp32 GEMM rate (GFLOP/s) per shape and overall, at torch's thread count.

    Each shape gets one warm-up call, then calls until ``seconds_per_shape`` is spent (at least
    ``min_calls``); see the module docstring for the per-shape rate and the overall weighting.
    """
    if not shapes:
        raise ValueError("measure_ceiling needs at least one shape")
    g = torch.Generator().manual_seed(0)
    rows, total_flops, total_s = [], 0.0, 0.0
    for shape in shapes:
        m, k, n = _measured_shape(shape, max_flops)
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up: page in the output, pack buffers
        best, spent, calls = float("inf"), 0.0, 0
        while calls < min_calls or spent < seconds_per_shape:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - start
            best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        rate = 2 * m * k * n / best
        rows.append({
            "name": shape.name, "m": shape.m, "k": shape.k, "n": shape.n, "count": shape.count,
            "measured": [m, k, n], "gflops": rate / 1e9,
        })  # fmt: skip
        total_flops += shape.flops * shape.count
        total_s += shape.flops * shape.count / rate
    return Ceiling(torch.get_num_threads(), total_flops / total_s / 1e9, rows)
