"""MiniDisc: a teacher assistant (TA) chosen in one trial, then the final hop TA -> student
(Zhang et al., 2024, "Minimal Distillation Schedule for Language Model Compression";
docs/design.md, "MiniDisc").

The student is the run's own (``student:``, the same shape, initialisation and budget as every
other method's); the TA candidates are width-pruned teachers strictly between teacher and student
in size. Phases, each run, checkpointed and resumed by the trainer like any other:

1. ``importance`` (no training): mask-gradient importance of every attention unit (a key/value
   group with its query heads; a head in GPT-2) and neuron of the teacher over
   ``minidisc.calibration_batches`` micro-batches, saved to ``minidisc/importance.safetensors``.
2. ``sandwich``: the TA starts as the teacher reordered by importance; per micro-batch the teacher
   runs once, every candidate sparsity s runs the shared TA weights as a prefix sub-network and
   adds (mean_k MSE(H_s^k, H_t^k) over every second hidden state, embeddings included,
   + T^2 KD(z_s, z_t)) / 2, divided by the number of candidates; one optimizer step.
3. ``scoring`` (no training): next-token accuracy and perplexity of every candidate on the
   development samples (the last ``minidisc.dev_samples`` of the training split, which the
   importance and the sandwich never see); score(s) = accuracy(s) + lam * s, the best is the TA:
   ``minidisc.json``, ``minidisc.md``, ``minidisc.png`` and ``ta_hf/``.
4. ``final_<phase>`` for every phase of ``minidisc.final_method``: the TA is the teacher of the
   run's student.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from ted_scale.config.parse import ConfigError, bounded
from ted_scale.config.schema import ScheduleConfig
from ted_scale.distill.filter_io import weights_fingerprint
from ted_scale.distill.methods.base import Method, MethodContext, Phase, PlannedPhase
from ted_scale.distill.methods.registry import get_method, register
from ted_scale.distill.modules import FrozenTapper, TappedOutputs
from ted_scale.distill.objectives import LossSettings, logit_distillation, mse_distance
from ted_scale.distill.run_models import place_teacher
from ted_scale.eval.heldout import heldout_perplexity
from ted_scale.flops import (
    FROZEN,
    TRAINED,
    batch_factor,
    forward_flops,
    head_flops,
    subnet_flops,
)
from ted_scale.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_safetensors,
)
from ted_scale.model import (
    FAMILIES,
    GPT,
    GPTConfig,
    ModelMismatchError,
    Subnet,
    export_hf,
    load_pretrained,
    set_dropout,
)
from ted_scale.model.pruning import Importance, extract, mask_importance, reorder, subnet_at
from ted_scale.parallel import barrier
from ted_scale.parallel.tensor import unsharded_copy

FINAL_PREFIX = "final_"
WORK_DIR = "minidisc"  # run_dir/minidisc: importance and the shared TA weights
IMPORTANCE_FILE = "importance.safetensors"
SHARED_TA = "ta_shared_hf"
SHOWN_LAMBDAS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # minidisc.md: the TA each would choose


@dataclass
class MiniDiscConfig:
    """MiniDisc's section (``minidisc:``)."""

    sparsities: list[float] | None = None
    """TA candidates: fractions of the teacher's prunable attention and FFN weights removed, each
    giving a model strictly between teacher and student in size. null: ``candidates`` evenly
    spaced between the teacher (0) and the student's size as a sparsity of the teacher."""
    candidates: int = bounded(4, ge=1)
    """How many candidates ``sparsities: null`` derives."""
    lam: float = bounded(0.2, ge=0.0)
    """The paper's lambda: score(s) = accuracy(s) + lam * s (YAML key ``lam``: ``lambda`` is a
    Python keyword)."""
    calibration_batches: int = bounded(64, ge=1)
    """Micro-batches of ``calibration_split`` the importance sums over."""
    calibration_split: str | None = None
    """Data split for the importance; null: ``data.train_split`` (its development samples left
    out, as from any use of the training split)."""
    dev_samples: int | None = bounded(None, ge=1)
    """The development split the candidates are scored on: the last ``dev_samples`` samples of
    ``data.train_split``, left out of the importance and the sandwich. null:
    ``eval.heldout_batches`` x ``batch.micro_batch_size``."""
    final_method: str = "ted"
    """The registered method of the final hop TA -> student, with all of its phases."""
    temperature: float = bounded(1.0, gt=0.0)
    """T of the sandwich's KD term (the paper: 1)."""
    layer_reduction: Literal["mean", "sum"] = "mean"
    """How the sandwich's hidden-state MSEs combine over the matched states (the authors' code:
    the mean)."""
    sandwich: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Schedule of the sandwich TA training."""

    def __post_init__(self) -> None:
        if self.sparsities is not None:
            if not self.sparsities:
                raise ValueError("sparsities: give at least one candidate, or null")
            for i, s in enumerate(self.sparsities):
                if not 0.0 < float(s) < 1.0:
                    raise ValueError(f"sparsities[{i}] = {s} must be in (0, 1)")
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


# ------------------------------------------------------------------------------ the candidates
def parameter_count(config: GPTConfig) -> int:
    """``GPT.num_params()`` of a model of shape ``config`` (built on the meta device)."""
    with torch.device("meta"):
        return GPT(config).num_params()


def candidate_parameters(teacher: GPTConfig, sparsity: float) -> int:
    """Parameters of the teacher's candidate at ``sparsity``. Every attention unit (a key/value
    group with its query heads) and every neuron holds as many weights as any other, so the count
    depends only on how many stay: uniform importance gives it before the real one is known."""
    g = teacher.kv_groups
    uniform = Importance(
        [torch.ones(h // g) for h in teacher.layer_heads],
        [torch.ones(n) for n in teacher.layer_inner],
        group_size=g,
    )
    return parameter_count(subnet_at(uniform, sparsity).apply_to(teacher))


class Sizes(NamedTuple):
    """Parameter counts of teacher and student, and their attention and FFN-neuron weights (the
    prunable ones: a model's size in the sense of the candidates' sparsity). Counted off the
    models themselves (``parameter_count``), so every family's parts are in: grouped key/value
    projections, SwiGLU's three matrices, an untied head, norms."""

    teacher: int
    student: int
    teacher_prunable: int
    student_prunable: int

    @property
    def student_sparsity(self) -> float:
        """The fraction of the teacher's prunable weights the student lacks (3 of 6 blocks: 0.5)."""
        return 1.0 - self.student_prunable / self.teacher_prunable


def model_sizes(teacher: GPTConfig, student: GPTConfig) -> Sizes:
    def prunable(config: GPTConfig, total: int) -> int:
        none = (0,) * config.n_layer
        return total - parameter_count(Subnet(none, none).apply_to(config))

    t, s = parameter_count(teacher), parameter_count(student)
    return Sizes(t, s, prunable(teacher, t), prunable(student, s))


def candidate_sparsities(config: MiniDiscConfig, sizes: Sizes, teacher: GPTConfig) -> list[float]:
    """``config.sparsities``, or ``config.candidates`` evenly spaced in (0, student sparsity).

    Raises ConfigError naming every candidate whose prunable weights are not strictly between
    the student's and the teacher's (one at or beyond the student is no assistant)."""
    values = config.sparsities
    if values is None:
        k = config.candidates
        values = sorted({round(sizes.student_sparsity * i / (k + 1), 3) for i in range(1, k + 1)})
    fixed = sizes.teacher - sizes.teacher_prunable  # embeddings, LayerNorms, output biases
    counts = [candidate_parameters(teacher, s) for s in values]
    bad = [
        f"{s:g} ({n:,} parameters)" for s, n in zip(values, counts, strict=True)
        if not sizes.student_prunable < n - fixed < sizes.teacher_prunable
    ]  # fmt: skip
    if bad:
        raise ConfigError(
            f"minidisc.sparsities: {', '.join(bad)}: a TA candidate must lie strictly between "
            f"the teacher ({sizes.teacher:,} parameters) and the student ({sizes.student:,}, "
            f"{1 - sizes.student_sparsity:.1%} of the teacher's attention-head and FFN-neuron "
            f"weights), i.e. at a sparsity in (0, {sizes.student_sparsity:.4g})"
        )
    return values


# ------------------------------------------------------------------------------ the choice
class Choice(NamedTuple):
    """ta: the sparsity of the candidate with the best score; scores: score(s) of every one."""

    ta: float
    scores: list[float]


def choose_sparsity(sparsities: list[float], performances: list[float], lam: float) -> Choice:
    """score(s) = performance(s) + lam * s for every candidate; the best score wins (on a tie the
    larger TA, i.e. the smaller sparsity)."""
    s = [float(x) for x in sparsities]  # numbers, never strings
    scores = [float(p) + float(lam) * x for x, p in zip(s, performances, strict=True)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -s[i]))
    return Choice(s[best], scores)


def dev_samples(config) -> int:
    """How many of the training split's last samples are the development split."""
    n = config.minidisc.dev_samples
    return n if n is not None else config.eval.heldout_batches * config.batch.micro_batch_size


def sorted_importance(importance: Importance) -> Importance:
    """``importance`` in the order ``reorder`` puts the units in (descending per block)."""

    def desc(v: Tensor) -> Tensor:
        return torch.sort(v, descending=True, stable=True).values

    return dataclasses.replace(
        importance,
        heads=[desc(v) for v in importance.heads],
        neurons=[desc(v) for v in importance.neurons],
    )


def tapped_blocks(n_layer: int) -> list[int]:
    """Every second hidden state after the embeddings: blocks 1, 3, 5, ... (0-based), i.e. HF's
    hidden_states[2], [4], ... (the embeddings, hidden_states[0], are tapped besides)."""
    return list(range(1, n_layer, 2))


# ------------------------------------------------------------------------------ the sandwich
class SandwichDistillation(nn.Module):
    """All TA candidates on the shared weights of ``student`` (the TA), one loss:
    mean over candidates of (mean_k MSE(H_s^k, H_t^k) + T^2 KD(z_s, z_t)) / 2
    (``layer_reduction="sum"``: sum_k).

    The teacher's states come in ``tapped.layer_states`` (embeddings first, then ``layers``);
    KD is KL(softmax(z_t / T) || softmax(z_s / T)) T^2 over the tokens with a label: the soft
    cross-entropy less the teacher's entropy, a constant (the same gradients).
    """

    def __init__(
        self,
        student: GPT,
        subnets: list[Subnet],
        layers: list[int],
        settings: LossSettings,
        *,
        temperature: float,
        layer_reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        super().__init__()
        self.student = student
        self.subnets = subnets
        self.layers = layers
        self.settings = settings
        self.temperature = temperature
        self.layer_reduction = layer_reduction

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        losses, layer_terms, kd_terms = [], [], []
        for subnet in self.subnets:
            out = self.student(
                input_ids, output_layers=self.layers, return_logits=False, subnet=subnet
            )
            states = [out.embeddings, *(out.hidden_states[i] for i in self.layers)]
            mse = torch.stack(mse_distance(states, tapped.layer_states))  # [matched states]
            layer = mse.mean() if self.layer_reduction == "mean" else mse.sum()
            kd = logit_distillation(
                out.last_hidden,
                self.student.loss_head()[0],
                tapped.last_hidden,
                tapped.head_weight,
                labels,
                self.settings,
                temperature=self.temperature,
                shard=self.student.loss_head()[1],
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
    model_families = FAMILIES  # pruned by whole key/value groups (docs/design.md, "Pruning")
    # Its sub-networks are not built for split or copied key/value heads.
    tensor_parallel_families = ("gpt2",)
    # The TA candidates train data-parallel as the student does; the teacher and, in the final
    # hop, the TA are split apart as the run's teacher is.
    teacher_apart = True
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

    # ---------------------------------------------------------------- candidates and data
    @staticmethod
    def _sizes(ctx: MethodContext) -> Sizes:
        return model_sizes(ctx.teacher.config, ctx.student.config)

    def _sparsities(self, ctx: MethodContext) -> list[float]:
        return candidate_sparsities(ctx.config.minidisc, self._sizes(ctx), ctx.teacher.config)

    @staticmethod
    def _training_part(config) -> slice:
        """The training split's samples the importance and the sandwich may see."""
        return slice(None, -dev_samples(config))

    # ---------------------------------------------------------------- 1. importance
    def _calibration(self, config) -> tuple[str, slice | None]:
        """The importance's split, and its samples: the training split less the development
        samples, any other split whole."""
        split = config.minidisc.calibration_split or config.data.train_split
        return split, self._training_part(config) if split == config.data.train_split else None

    def _importance_record(self, ctx: MethodContext) -> dict[str, str]:
        config = ctx.config
        split, samples = self._calibration(config)
        return {
            "teacher_fingerprint": weights_fingerprint(ctx.teacher),
            "calibration_split": split,
            "calibration_samples": "all" if samples is None else f"[:{samples.stop}]",
            "calibration_batches": str(config.minidisc.calibration_batches),
        }

    def _importance(self, name: str, ctx: MethodContext) -> Phase:
        self._sparsities(ctx)  # refuse bad candidates before any work

        def finish() -> None:
            path = ctx.run_dir / WORK_DIR / IMPORTANCE_FILE
            if path.exists():  # saved by a run killed before its end
                barrier()
                return
            record = self._importance_record(ctx)  # collectives: on every rank
            teacher = ctx.teacher
            if teacher.tensor_parallel is not None:
                teacher = unsharded_copy(teacher)
            if ctx.is_main:
                split, samples = self._calibration(ctx.config)
                batches = ctx.batches(split, ctx.config.minidisc.calibration_batches, samples)
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
        tensors, found = read_safetensors(path)
        expected = self._importance_record(ctx)
        if found != expected:
            diff = sorted(k for k in expected if found.get(k) != expected[k])
            raise ModelMismatchError(
                f"{path} was computed for another teacher or calibration ({', '.join(diff)} "
                "differ): remove it or use another output_dir"
            )
        config = ctx.teacher.config
        return Importance(
            [tensors[f"heads.{i}"] for i in range(config.n_layer)],
            [tensors[f"neurons.{i}"] for i in range(config.n_layer)],
            group_size=config.kv_groups,
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
        subnets = [subnet_at(ranked, s) for s in self._sparsities(ctx)]
        layers = tapped_blocks(teacher.config.n_layer)
        trained = SandwichDistillation(
            ta,
            subnets,
            layers,
            ctx.loss_settings,
            temperature=config.minidisc.temperature,
            layer_reduction=config.minidisc.layer_reduction,
        )

        def flops_per_token(seq_len: int) -> float:
            frozen = forward_flops(teacher.blocks, seq_len) * batch_factor(teacher)
            frozen += head_flops(teacher)
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
            train_samples=self._training_part(config),
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
        n_dev = dev_samples(config)
        batches = math.ceil(n_dev / config.batch.micro_batch_size)
        dev = ctx.batches(config.data.train_split, batches, slice(-n_dev, None))
        sizes = self._sizes(ctx)
        sparsities = self._sparsities(ctx)

        def measure(s: float) -> dict:
            model = extract(shared, subnet_at(ranked, s))
            result = heldout_perplexity(model, dev, device=ctx.device)
            return {
                "sparsity": s,
                "parameters": model.num_params(),
                "accuracy": result["accuracy"],
                "perplexity": result["perplexity"],
            }

        rows = [measure(s) for s in sparsities]
        accuracies = [r["accuracy"] for r in rows]
        choice = choose_sparsity(sparsities, accuracies, md.lam)
        for row, score in zip(rows, choice.scores, strict=True):
            row["score"] = score
        report = {
            "lam": md.lam,
            "dev": {
                "split": config.data.train_split,
                "samples": f"the last {n_dev}",
                "tokens": sum(int((labels != -100).sum()) for _, labels in dev),
            },
            "teacher_parameters": sizes.teacher,
            "student_parameters": sizes.student,
            "student_sparsity": sizes.student_sparsity,
            "candidates": rows,
            "ta": next(r for r in rows if r["sparsity"] == choice.ta),
            "ta_by_lambda": {
                f"{lam:g}": choose_sparsity(sparsities, accuracies, lam).ta
                for lam in sorted({*SHOWN_LAMBDAS, md.lam})
            },
        }
        atomic_write_json(ctx.run_dir / "minidisc.json", report)
        atomic_write_text(ctx.run_dir / "minidisc.md", schedule_markdown(report))
        plot_schedule(report, ctx.run_dir / "minidisc.png")
        ta = extract(shared, subnet_at(ranked, choice.ta))
        path = export_hf(ta, ctx.run_dir / "ta_hf", ctx.tokenizer)  # a plain copy: no collective
        ctx.log(f"TA at sparsity {choice.ta:g} ({ta.num_params():,} parameters) exported to {path}")

    # ---------------------------------------------------------------- 4. the final hop
    def _final_context(self, ctx: MethodContext) -> MethodContext:
        """The final method's context: the TA (``ta_hf/``) is the frozen teacher of the run's
        own student (the teacher's blocks at the layer map, as every method's): the TA has the
        teacher's depth, so the layer map holds."""
        if self._final_ctx is not None:
            return self._final_ctx
        config = ctx.config
        path = ctx.run_dir / "ta_hf"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no TA; run the scoring phase first")
        ta = load_pretrained(path, attention=config.model.attention)
        # The TA's blocks have the pruned shapes scoring chose: padded where tp does not divide;
        # split as the teacher is (apart from the student, or alike).
        place_teacher(
            ta, config, ctx.device, ctx.compute_dtype, ctx.dims, ctx.teacher_dims, pad=True
        )
        self._final_ctx = dataclasses.replace(ctx, teacher=ta)
        return self._final_ctx


# ------------------------------------------------------------------------------ the report
def schedule_markdown(report: dict) -> str:
    """``minidisc.md``: every candidate's size, development accuracy and score, the TA, and the
    TA other lambdas would choose."""
    teacher, student = report["teacher_parameters"], report["student_parameters"]
    dev = report["dev"]
    lines = [
        "# MiniDisc schedule",
        "",
        f"score(s) = development next-token accuracy(s) + {report['lam']:g} * s, s the sparsity "
        f"(the fraction of the teacher's prunable attention and FFN weights removed). "
        f"Development split: {dev['samples']} samples of `{dev['split']}` ({dev['tokens']:,} "
        "tokens), never trained on by the TA; the reported test split is not read.",
        "",
        "| model | sparsity | parameters | of the teacher | accuracy | perplexity | score | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| teacher | 0 | {teacher:,} | 100.0 % | | | | |",
    ]
    for r in report["candidates"]:
        mark = "**TA**" if r["sparsity"] == report["ta"]["sparsity"] else ""
        lines.append(
            f"| candidate | {r['sparsity']:g} | {r['parameters']:,} | "
            f"{100 * r['parameters'] / teacher:.1f} % | {r['accuracy']:.4f} | "
            f"{r['perplexity']:.3f} | {r['score']:.4f} | {mark} |"
        )
    lines += [
        f"| student | {report['student_sparsity']:.4g} | {student:,} | "
        f"{100 * student / teacher:.1f} % | | | | |",
        "",
        "The TA at other lambdas (the same accuracies): "
        + ", ".join(f"{lam} -> {s:g}" for lam, s in report["ta_by_lambda"].items())
        + ".",
        "",
        f"TA: sparsity {report['ta']['sparsity']:g}, {report['ta']['parameters']:,} parameters; "
        "exported to `ta_hf/`, the teacher of the final hop to the student.",
        "",
    ]
    return "\n".join(lines)


def plot_schedule(report: dict, path: Path) -> None:
    """Development accuracy against sparsity, each candidate labelled with its size and score;
    the lambda line through the TA (accuracy = TA's score - lam * s: a candidate above it would
    have scored better) and the student's size as a sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["candidates"]
    s = [r["sparsity"] for r in rows]
    ta, lam = report["ta"], report["lam"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, [r["accuracy"] for r in rows], "o-", label="candidates")
    for r in rows:
        ax.annotate(
            f"{r['parameters'] / 1e6:.3g} M\nscore {r['score']:.3f}",
            (r["sparsity"], r["accuracy"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    line = [0.0, report["student_sparsity"]]
    ax.plot(line, [ta["score"] - lam * x for x in line], "--", label=f"lambda = {lam:g}")
    ax.plot([ta["sparsity"]], [ta["accuracy"]], "r*", markersize=12, label="TA")
    ax.axvline(
        report["student_sparsity"],
        color="gray",
        linestyle=":",
        label=f"student ({report['student_parameters'] / 1e6:.3g} M)",
    )
    ax.set_xlabel("sparsity (fraction of the teacher's prunable weights removed)")
    ax.set_ylabel("development next-token accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
