"""MiniDisc: a teacher assistant (TA) chosen in one trial, then the final hop TA -> student
(Zhang et al., 2024, "Minimal Distillation Schedule for Language Model Compression";
docs/design.md, "MiniDisc").

Phases, each run, checkpointed and resumed by the trainer like any other:

1. ``importance`` (no training): mask-gradient importance of every head and neuron of the teacher
   over ``minidisc.calibration_batches`` micro-batches, saved to ``minidisc/importance.safetensors``.
2. ``sandwich``: the TA starts as the teacher reordered by importance; per micro-batch the teacher
   runs once, every candidate sparsity s runs the shared TA weights as a prefix sub-network and
   adds (sum_k MSE(H_s^k, H_t^k) over every second hidden state, embeddings included,
   + T^2 KD(z_s, z_t)) / 2, divided by the number of candidates; one optimizer step.
3. ``scoring`` (no training): held-out next-token accuracy and perplexity of every candidate,
   score(s) = accuracy(s) + lam * s, the best one (capped at the target) is the TA:
   ``minidisc.json``, ``minidisc.md``, ``minidisc.png`` and ``ta_hf/``.
4. ``final_<phase>`` for every phase of ``minidisc.final_method``: the TA is the teacher, the
   student is cut from the TA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from ted_scale.config.parse import ConfigError, bounded
from ted_scale.config.schema import ScheduleConfig
from ted_scale.distill.filter_io import weights_fingerprint
from ted_scale.distill.layer_map import resolve_layer_map
from ted_scale.distill.methods import get_method, register
from ted_scale.distill.methods.base import Method, MethodContext, Phase, PlannedPhase
from ted_scale.distill.modules import FrozenTapper, TappedOutputs, to_compute_dtype
from ted_scale.distill.objectives import kl_distillation, mse_distance
from ted_scale.eval.heldout import heldout_perplexity
from ted_scale.flops import FROZEN, TRAINED, forward_flops, head_flops, subnet_flops
from ted_scale.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ted_scale.model import (
    GPT,
    ModelMismatchError,
    Subnet,
    export_hf,
    load_pretrained,
    set_dropout,
    student_from_teacher,
)
from ted_scale.model.compile import compile_blocks, compile_enabled
from ted_scale.model.pruning import Importance, extract, mask_importance, reorder, subnet_at
from ted_scale.parallel import barrier
from ted_scale.parallel.tensor import tensor_parallel_group, unsharded_copy
from ted_scale.precision import storage_dtype

FINAL_PREFIX = "final_"
WORK_DIR = "minidisc"  # run_dir/minidisc: importance and the shared TA weights
IMPORTANCE_FILE = "importance.safetensors"
SHARED_TA = "ta_shared_hf"


@dataclass
class MiniDiscConfig:
    """MiniDisc's section (``minidisc:``)."""

    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    """TA candidates: fractions of the teacher's prunable attention and FFN weights removed."""
    lam: float = bounded(0.2, ge=0.0)
    """The paper's lambda: score(s) = accuracy(s) + lam * s (YAML key ``lam``: ``lambda`` is a
    Python keyword)."""
    calibration_batches: int = bounded(64, ge=1)
    """Micro-batches of ``calibration_split`` the importance sums over."""
    calibration_split: str | None = None
    """Data split for the importance; null: ``data.train_split``."""
    target: float | None = bounded(None, gt=0.0, lt=1.0)
    """The student's shape. A sparsity of the teacher: the student is the TA pruned to it.
    null: ``student.n_layer`` blocks of the TA at ``student.layer_map`` (the paper's 6-layer
    student), whose target sparsity is 1 - n_layer / teacher layers."""
    final_method: str = "ted"
    """The registered method of the final hop TA -> student, with all of its phases."""
    temperature: float = bounded(1.0, gt=0.0)
    """T of the sandwich's KD term (the paper: 1)."""
    sandwich: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Schedule of the sandwich TA training."""

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise ValueError("sparsities: give at least one candidate")
        for i, s in enumerate(self.sparsities):
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsities[{i}] = {s} must be in [0, 1)")
        values = sorted(float(s) for s in self.sparsities)  # numbers, never strings
        if len(set(values)) != len(values):
            raise ValueError(f"sparsities has a repeated value: {self.sparsities}")
        self.sparsities = values
        self.lam = float(self.lam)
        if self.final_method == MiniDisc.name:
            raise ValueError("final_method cannot be minidisc itself")
        try:
            get_method(self.final_method)
        except ConfigError as e:
            raise ValueError(f"final_method: {e}") from None


# ------------------------------------------------------------------------------ the choice
class Choice(NamedTuple):
    """best: the candidate with the best score; ta: the TA's sparsity (best, or the target when
    best is beyond it); scores: score(s) of every candidate."""

    best: float
    ta: float
    scores: list[float]


def choose_sparsity(
    sparsities: list[float], performances: list[float], lam: float, target: float
) -> Choice:
    """score(s) = performance(s) + lam * s for every candidate; the best score wins (on a tie the
    larger TA, i.e. the smaller sparsity); a winner beyond the ``target`` sparsity (smaller than
    the student) is replaced by the target."""
    s = [float(x) for x in sparsities]  # numbers, never strings
    scores = [float(p) + float(lam) * x for x, p in zip(s, performances, strict=True)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -s[i]))
    return Choice(s[best], min(s[best], float(target)), scores)


def target_sparsity(config, teacher_layers: int) -> float:
    """The student's sparsity relative to the teacher (``minidisc.target``, or by depth)."""
    target = config.minidisc.target
    return target if target is not None else 1.0 - config.student.n_layer / teacher_layers


def sorted_importance(importance: Importance) -> Importance:
    """``importance`` in the order ``reorder`` puts the units in (descending per block)."""

    def desc(v: Tensor) -> Tensor:
        return torch.sort(v, descending=True, stable=True).values

    return Importance([desc(v) for v in importance.heads], [desc(v) for v in importance.neurons])


def tapped_blocks(n_layer: int) -> list[int]:
    """Every second hidden state after the embeddings: blocks 1, 3, 5, ... (0-based), i.e. HF's
    hidden_states[2], [4], ... (the embeddings, hidden_states[0], are tapped besides)."""
    return list(range(1, n_layer, 2))


# ------------------------------------------------------------------------------ the sandwich
class SandwichDistillation(nn.Module):
    """All TA candidates on the shared weights of ``student`` (the TA), one loss:
    mean over candidates of (sum_k MSE(H_s^k, H_t^k) + T^2 KD(z_s, z_t)) / 2.

    The teacher's states come in ``tapped.layer_states`` (embeddings first, then ``layers``);
    KD is KL(softmax(z_t / T) || softmax(z_s / T)) T^2 over the tokens with a label: the soft
    cross-entropy less the teacher's entropy, a constant (the same gradients).
    """

    def __init__(
        self,
        student: GPT,
        subnets: list[Subnet],
        layers: list[int],
        *,
        temperature: float,
        fused: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.subnets = subnets
        self.layers = layers
        self.temperature = temperature
        self.fused = fused
        self.compute_dtype = compute_dtype

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        losses, layer_terms, kd_terms = [], [], []
        for subnet in self.subnets:
            out = self.student(
                input_ids, output_layers=self.layers, return_logits=False, subnet=subnet
            )
            states = [out.embeddings, *(out.hidden_states[i] for i in self.layers)]
            layer = torch.stack(mse_distance(states, tapped.layer_states)).sum()
            kd = kl_distillation(
                to_compute_dtype(out.last_hidden, self.compute_dtype),
                self.student.lm_head_weight,
                to_compute_dtype(tapped.last_hidden, self.compute_dtype),
                tapped.head_weight,
                labels,
                temperature=self.temperature,
                fused=self.fused,
            )
            losses.append((layer + kd) / 2)
            layer_terms.append(layer.detach())
            kd_terms.append(kd.detach())
        loss = torch.stack(losses).sum() / len(losses)
        parts = {
            "loss_layer": torch.stack(layer_terms).mean(),
            "loss_kd": torch.stack(kd_terms).mean(),
        }
        parts.update({f"loss_candidate_{i}": c.detach() for i, c in enumerate(losses)})
        return loss, parts


# ------------------------------------------------------------------------------ the method
@register
class MiniDisc(Method):
    name = "minidisc"
    section = ("minidisc", MiniDiscConfig)

    def __init__(self) -> None:
        self._final_ctx: MethodContext | None = None

    # ---------------------------------------------------------------- plan
    @staticmethod
    def _final(config) -> Method:
        return get_method(config.minidisc.final_method)

    def plan(self, config) -> list[PlannedPhase]:
        own = [
            PlannedPhase("importance", "filters"),
            PlannedPhase("sandwich", "filters"),
            PlannedPhase("scoring", "filters"),
        ]
        final = [
            PlannedPhase(FINAL_PREFIX + p.name, p.kind) for p in self._final(config).plan(config)
        ]
        return own + final

    def benchmarked(self, config) -> str:
        """The sandwich step: MiniDisc's own cost (the final hop is its method's step)."""
        return "sandwich"

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        if phase == "importance":
            return self._importance(phase, ctx)
        if phase == "sandwich":
            return self._sandwich(phase, ctx)
        if phase == "scoring":
            return self._scoring(phase, ctx)
        inner = phase.removeprefix(FINAL_PREFIX)
        built = self._final(ctx.config).build(inner, self._final_context(ctx))
        return dataclasses.replace(built, name=phase)

    # ---------------------------------------------------------------- 1. importance
    @staticmethod
    def _importance_record(ctx: MethodContext) -> dict[str, str]:
        config = ctx.config.minidisc
        return {
            "teacher_fingerprint": weights_fingerprint(ctx.teacher),
            "calibration_split": config.calibration_split or ctx.config.data.train_split,
            "calibration_batches": str(config.calibration_batches),
        }

    def _importance(self, name: str, ctx: MethodContext) -> Phase:
        def finish() -> None:
            path = ctx.run_dir / WORK_DIR / IMPORTANCE_FILE
            if path.exists():  # saved by a run killed before its end
                barrier()
                return
            record = self._importance_record(ctx)  # collectives: on every rank
            teacher = ctx.teacher
            if tensor_parallel_group(teacher) is not None:
                teacher = unsharded_copy(teacher)
            if ctx.is_main:
                batches = ctx.batches(
                    record["calibration_split"], int(record["calibration_batches"])
                )
                importance = mask_importance(teacher, batches, fused=ctx.config.fused_loss)
                tensors = {f"heads.{i}": v.float().cpu() for i, v in enumerate(importance.heads)}
                tensors |= {
                    f"neurons.{i}": v.float().cpu() for i, v in enumerate(importance.neurons)
                }
                atomic_write_bytes(path, save_safetensors(tensors, metadata=record))
                ctx.log(f"importance of heads and neurons saved to {path}")
            barrier()

        return Phase(name, None, None, ctx.config.minidisc.sandwich, lambda _: 0.0, finish=finish)

    def _load_importance(self, ctx: MethodContext) -> Importance:
        path = ctx.run_dir / WORK_DIR / IMPORTANCE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no importance; run the importance phase first")
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        expected = self._importance_record(ctx)
        if found != expected:
            diff = sorted(k for k in expected if found.get(k) != expected[k])
            raise ModelMismatchError(
                f"{path} was computed for another teacher or calibration ({', '.join(diff)} "
                "differ): remove it or use another output_dir"
            )
        n = ctx.teacher.config.n_layer
        return Importance(
            [tensors[f"heads.{i}"] for i in range(n)], [tensors[f"neurons.{i}"] for i in range(n)]
        )

    # ---------------------------------------------------------------- 2. sandwich
    def _sandwich(self, name: str, ctx: MethodContext) -> Phase:
        config, teacher = ctx.config, ctx.teacher
        importance = self._load_importance(ctx)
        ta = unsharded_copy(teacher).float().to(ctx.device)
        set_dropout(ta, config.student.dropout)
        ta.activation_checkpointing = config.model.activation_checkpointing
        ranked = reorder(ta, importance)  # the same function; every candidate now a prefix
        # Sharded after the reordering, so that each rank's heads and neurons are a contiguous
        # run of the ranked ones and every candidate a prefix of each rank's shard.
        ctx.place(ta.train().requires_grad_(True), "student", pad=True)
        subnets = [subnet_at(ranked, s) for s in config.minidisc.sparsities]
        layers = tapped_blocks(teacher.config.n_layer)
        trained = SandwichDistillation(
            ta,
            subnets,
            layers,
            temperature=config.minidisc.temperature,
            fused=config.fused_loss,
            compute_dtype=ctx.compute_dtype,
        )

        def flops_per_token(seq_len: int) -> float:
            frozen = forward_flops(teacher.blocks, seq_len) + head_flops(teacher)
            # Per candidate: its prefix forward and backward, its head, and the teacher's head
            # inside the fused KD.
            trained_ = sum(subnet_flops(ta, s, seq_len) + head_flops(ta) for s in subnets)
            return FROZEN * (frozen + len(subnets) * head_flops(teacher)) + TRAINED * trained_

        return Phase(
            name,
            trained,
            FrozenTapper(teacher, layers, with_top=True, with_embeddings=True),
            config.minidisc.sandwich,
            flops_per_token,
            finish=lambda: ctx.export(ta, f"{WORK_DIR}/{SHARED_TA}"),
        )

    # ---------------------------------------------------------------- 3. scoring
    def _scoring(self, name: str, ctx: MethodContext) -> Phase:
        def finish() -> None:
            ranked = sorted_importance(self._load_importance(ctx))  # a collective: every rank
            if ctx.is_main:
                self._score(ctx, ranked)
            barrier()

        return Phase(name, None, None, ctx.config.minidisc.sandwich, lambda _: 0.0, finish=finish)

    def _score(self, ctx: MethodContext, ranked: Importance) -> None:
        config = ctx.config
        md = config.minidisc
        shared = load_pretrained(ctx.run_dir / WORK_DIR / SHARED_TA).to(ctx.device)
        heldout = ctx.batches(config.data.eval_split, config.eval.heldout_batches)
        target = target_sparsity(config, ctx.teacher.config.n_layer)

        def measure(s: float) -> dict:
            model = extract(shared, subnet_at(ranked, s))
            result = heldout_perplexity(model, heldout, device=ctx.device)
            return {
                "sparsity": s,
                "parameters": model.num_params(),
                "accuracy": result["accuracy"],
                "perplexity": result["perplexity"],
            }

        rows = [measure(s) for s in md.sparsities]
        choice = choose_sparsity(md.sparsities, [r["accuracy"] for r in rows], md.lam, target)
        chosen = choice.ta
        for row, score in zip(rows, choice.scores, strict=True):
            row["score"] = score
        ta_row = next((r for r in rows if r["sparsity"] == chosen), None) or measure(chosen)
        report = {
            "lam": md.lam,
            "target_sparsity": target,
            "teacher_parameters": shared.num_params(),  # the teacher's shape, whole
            "candidates": rows,
            "best_candidate": choice.best,
            "ta": {**ta_row, "capped_at_target": choice.best > chosen},
        }
        atomic_write_json(ctx.run_dir / "minidisc.json", report)
        atomic_write_text(ctx.run_dir / "minidisc.md", schedule_markdown(report))
        plot_schedule(report, ctx.run_dir / "minidisc.png")
        ta = extract(shared, subnet_at(ranked, chosen))
        path = export_hf(ta, ctx.run_dir / "ta_hf", ctx.tokenizer)  # a plain copy: no collective
        ctx.log(f"TA at sparsity {chosen:g} ({ta.num_params():,} parameters) exported to {path}")

    # ---------------------------------------------------------------- 4. the final hop
    def _final_context(self, ctx: MethodContext) -> MethodContext:
        """The final method's context: the TA (``ta_hf/``) is the frozen teacher; the student is
        the TA pruned to ``minidisc.target``, or ``student.n_layer`` of its blocks."""
        if self._final_ctx is not None:
            return self._final_ctx
        config = ctx.config
        path = ctx.run_dir / "ta_hf"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no TA; run the scoring phase first")
        ta = load_pretrained(path, attention=config.model.attention)
        if config.minidisc.target is not None:
            ranked = sorted_importance(self._load_importance(ctx))
            student = extract(ta, subnet_at(ranked, config.minidisc.target))
            layer_map = list(range(ta.config.n_layer))
        else:
            try:
                layer_map = resolve_layer_map(
                    config.student.layer_map, ta.config.n_layer, config.student.n_layer
                )
            except ValueError as e:
                raise ModelMismatchError(f"student.layer_map: {e}") from e
            student = student_from_teacher(ta, layer_map)
        set_dropout(student, config.student.dropout)
        student.activation_checkpointing = config.model.activation_checkpointing
        # The TA's blocks have the pruned shapes scoring chose: padded where tp does not divide.
        ctx.place(student.train().requires_grad_(True), "student", pad=True)
        ta.eval().requires_grad_(False).to(ctx.device, dtype=storage_dtype(ctx.compute_dtype))
        ctx.place(ta, "teacher", pad=True)
        if compile_enabled(config.model.compile, ctx.device):
            compile_blocks(ta)
            compile_blocks(student)
        self._final_ctx = dataclasses.replace(ctx, teacher=ta, student=student, layer_map=layer_map)
        return self._final_ctx


# ------------------------------------------------------------------------------ the report
def schedule_markdown(report: dict) -> str:
    """``minidisc.md``: every candidate and the chosen TA."""
    ta = report["ta"]
    lines = [
        "# MiniDisc schedule",
        "",
        f"score(s) = held-out next-token accuracy(s) + {report['lam']:g} * s; "
        f"target sparsity {report['target_sparsity']:.4g}; "
        f"teacher {report['teacher_parameters']:,} parameters.",
        "",
        "| sparsity | parameters | accuracy | perplexity | score | |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["candidates"]:
        mark = "TA" if r["sparsity"] == ta["sparsity"] else ""
        lines.append(
            f"| {r['sparsity']:.2f} | {r['parameters']:,} | {r['accuracy']:.4f} | "
            f"{r['perplexity']:.3f} | {r['score']:.4f} | {mark} |"
        )
    capped = " (the best candidate was beyond the target: the target is used)"
    lines += [
        "",
        f"TA: sparsity {ta['sparsity']:.4g}, {ta['parameters']:,} parameters, accuracy "
        f"{ta['accuracy']:.4f}, perplexity {ta['perplexity']:.3f}"
        + (capped if ta["capped_at_target"] else "")
        + "; exported to `ta_hf/`.",
        "",
    ]
    return "\n".join(lines)


def plot_schedule(report: dict, path: Path) -> None:
    """Accuracy against sparsity, and the lambda line through the TA: the points with the TA's
    score, accuracy = score - lam * s (a candidate above it would have scored better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["candidates"]
    s = [r["sparsity"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    ta = report["ta"]
    best = ta["accuracy"] + report["lam"] * ta["sparsity"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(s, acc, "o-", label="candidates")
    line = [min(s), max(s)]
    ax.plot(
        line, [best - report["lam"] * x for x in line], "--", label=f"lambda = {report['lam']:g}"
    )
    ax.plot([ta["sparsity"]], [ta["accuracy"]], "r*", markersize=12, label="TA")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("held-out next-token accuracy")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
