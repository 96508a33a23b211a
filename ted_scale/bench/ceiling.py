"""This CPU's fp32 matmul ceiling: the sustained GEMM rate at a step's own shapes and thread count.

The throughput benchmark divides each configuration's achieved FLOP/s by this rate ("CPU MFU"),
so a figure says how far the whole step is from what the machine's matrix units do on the same
matrices. Per shape, ``C = A @ B`` runs into a preallocated output (as the fused losses do) after
one warm-up call, until a short time budget and ``min_calls`` are spent; its rate is the fastest
call's (the least disturbed on a shared machine, as the benchmark's own step times). The overall
rate weights each shape by the FLOPs the step spends on it: total FLOPs / total time at the
per-shape rates.

Shapes are measured as they are, never scaled down: a [256, 256] x [256, 50257] product runs at
half the rate of the same product cut to 3,141 columns on this kind of machine (its 51 MB operands
leave the caches), so a cut shape would overstate the ceiling. Each matmul runs ``1 + min_calls``
times, fewer than one benchmark configuration's warm-up and timed steps run it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ted_scale.kernels import default_chunk_size
from ted_scale.model.gpt import GPTConfig


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
    tokens: int, arch: GPTConfig, student_layers: int, teacher_layers: int = 0
) -> list[GemmShape]:
    """The matmuls of a distillation step (attention's own batched products aside) between
    models of ``arch``'s blocks, width and vocabulary.

    tokens: B*T rows; the LM head's products take ``default_chunk_size(vocab)`` rows at a time, as
    the fused losses run them. Each projection k -> n of the student runs forward ([N, k] x [k, n])
    and both backward products (grad input [N, n] x [n, k], grad weight [n, N] x [N, k]); the
    frozen teacher's run forward only, its LM head included when ``teacher_layers`` > 0. Block
    projections: ``block_projections``.
    """
    shapes: dict[tuple[int, int, int], list] = {}

    def linear(rows: int, k: int, n: int, forward: int, backward: int, name: str) -> None:
        for mkn, count, label in (
            ((rows, k, n), forward, name),
            ((rows, n, k), backward, f"{name} grad input"),
            ((n, rows, k), backward, f"{name} grad weight"),
        ):
            if count:
                shapes.setdefault(mkn, [0, label])[0] += count

    vocab = arch.vocab_size
    chunk = min(tokens, default_chunk_size(vocab))
    chunks = -(-tokens // chunk)
    linear(chunk, arch.n_embd, vocab, (1 + (teacher_layers > 0)) * chunks, chunks, "lm head")
    for k, n, name in block_projections(arch):
        linear(tokens, k, n, student_layers + teacher_layers, student_layers, name)
    return [GemmShape(*mkn, count, name) for mkn, (count, name) in shapes.items()]


def block_projections(arch: GPTConfig) -> list[tuple[int, int, str]]:
    """(d_in, d_out, name) of each projection of one block: q, k and v in one (k and v
    ``kv_heads`` heads wide under grouped-query attention), the attention output, and the FFN's
    up and down (GPT-2), or SwiGLU's gate, up and down (the Llama family; gate and up share a
    shape and a name)."""
    d, ffn = arch.n_embd, arch.layer_inner[0]
    q, kv = arch.n_head * arch.head_dim, arch.kv_heads * arch.head_dim
    ffn_in = [(d, ffn, "mlp gate, up")] * 2 if arch.llama_like else [(d, ffn, "mlp up")]
    return [(d, q + 2 * kv, "qkv"), (q, d, "attn out"), *ffn_in, (ffn, d, "mlp down")]


@dataclass(frozen=True)
class Ceiling:
    threads: int
    gflops: float  # FLOP-weighted over the shapes
    shapes: list[dict]  # per shape: name, m, k, n, count, gflops


def _overall_gflops(shapes: list[dict]) -> float:
    """Total FLOPs / total time of the shapes at their rates."""
    work = [2 * s["m"] * s["k"] * s["n"] * s["count"] for s in shapes]
    return sum(work) / sum(w / s["gflops"] for w, s in zip(work, shapes, strict=True))


def best_ceiling(a: Ceiling, b: Ceiling) -> Ceiling:
    """Per shape the faster of two measurements of the same shapes (say, at the start and the end
    of a benchmark run on a shared machine, whose load changes the rate twofold), overall again."""
    if [(s["m"], s["k"], s["n"]) for s in a.shapes] != [(s["m"], s["k"], s["n"]) for s in b.shapes]:
        raise ValueError("best_ceiling needs two measurements of the same shapes")
    shapes = [max(x, y, key=lambda s: s["gflops"]) for x, y in zip(a.shapes, b.shapes, strict=True)]
    return Ceiling(a.threads, _overall_gflops(shapes), shapes)


def measure_ceiling(
    shapes: Sequence[GemmShape],
    *,
    seconds_per_shape: float = 0.05,
    min_calls: int = 2,
) -> Ceiling:
    """The sustained fp32 GEMM rate (GFLOP/s) per shape and overall, at torch's thread count.

    Each shape gets one warm-up call, then calls until ``seconds_per_shape`` is spent (at least
    ``min_calls``); see the module docstring for the per-shape rate and the overall weighting.
    """
    if not shapes:
        raise ValueError("measure_ceiling needs at least one shape")
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        m, k, n = shape.m, shape.k, shape.n
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
            "name": shape.name, "m": m, "k": k, "n": n, "count": shape.count,
            "gflops": rate / 1e9,
        })  # fmt: skip
    return Ceiling(torch.get_num_threads(), _overall_gflops(rows), rows)
