"""CR-ILD: last-layer intermediate distillation with mixup and consistency regularisation (Ko et
al., 2023, "Revisiting Intermediate Layer Distillation for Compressing Language Models: An
Overfitting Perspective"), adapted to causal language models (docs/design.md, "CR-ILD").

Every micro-batch x is mixed with its reverse along the batch: x_mix = lambda * e(x) +
(1 - lambda) * e(x_rev) on the token embeddings (positions, learned or rotary, are the same for
both), with lambda ~ Beta(alpha, alpha), lambda <- max(lambda, 1 - lambda), drawn where the batch
is made so the teacher (run ahead when prefetching) mixes with the same lambda. On x_mix the
student's block k is matched with the teacher's block m:

- ILD: the query-query, key-key and value-value relations of the block's heads, softmax(X X^T /
  sqrt(d_head)) over the causal keys for X = Q, K, V (Q and K as the attention compares them:
  normed and rotated in the Llama family; K and V per key/value head), each matched by KL
  (``qkv``, the authors' ``TinyBERT-QKV`` run); MSE(fit(H_s^k), H_t^m) (``hidden``; fit is a
  learnable Linear when the widths differ) and KL(A_t^m || A_s^k) between the attention
  distributions (``attention``);
- consistency: w_ic * r(t) * [lambda D(S(x_mix), sg S(x)) + (1 - lambda) D(S(x_mix), sg S(x_rev))]
  on the student's own states S (relations, hidden, attention; D the object's distance), S(x) from an
  extra clean-input student pass without gradients; r(t) the progress through the phase;
- ``two_stage`` (as published): the ``ild`` phase trains on ILD + consistency, then ``stage2`` on
  CE + alpha_kd * KD (or KD alone, ``stage2_loss: kd``, as the authors ran it) on clean inputs.
  ``joint``: one phase on the mixed input,
  lambda CE(y) + (1 - lambda) CE(y_rev) + alpha_kd * KD + alpha_layer * (ILD + consistency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import save
from torch import Tensor, nn

from ted_scale.config.parse import bounded
from ted_scale.distill.methods.base import (
    ExtraModules,
    Method,
    MethodContext,
    Phase,
    PlannedPhase,
    student_flops,
)
from ted_scale.distill.methods.registry import register
from ted_scale.distill.modules import (
    FrozenTapper,
    TappedOutputs,
    gather_batch,
    lm_objective,
    own_rows,
    own_rows_all_heads,
)
from ted_scale.distill.objectives import LossSettings, attention_kl, mse
from ted_scale.flops import FROZEN, TRAINED, batch_factor, forward_flops
from ted_scale.io import atomic_write_bytes, read_safetensors
from ted_scale.model import FAMILIES, GPT, GPTConfig, GPTOutput, ModelMismatchError
from ted_scale.model.hf import load_state_checked
from ted_scale.model.tp_layout import TensorParallelLayout
from ted_scale.parallel.tensor import tensor_parallel_sum


@dataclass
class CRILDConfig:
    """CR-ILD's section (``cr_ild:``)."""

    mixup_alpha: float = bounded(1.0, ge=0.0)
    """lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda); 0 is the limit: lambda = 1
    (no mixing)."""
    consistency_weight: float = bounded(0.1, ge=0.0)
    """w_ic; 0 turns the consistency terms (and their clean-input student pass) off."""
    consistency_ramp: Literal["linear", "none"] = "linear"
    """r(t): the progress through the phase (0 at its first step), or 1 throughout."""
    objects: Literal["qkv", "hidden", "attention", "both"] = "qkv"
    """What is distilled (and kept consistent): the Q-Q, K-K, V-V relations (the authors' run),
    hidden states, attention distributions, or both of the last two."""
    stages: Literal["two_stage", "joint"] = "two_stage"
    """``two_stage``: ILD phase (``stage1`` schedule), then logit KD (``stage2``); ``joint``: one
    phase (``stage2`` schedule) with CE + alpha_kd KD + alpha_layer (ILD + consistency)."""
    stage2_loss: Literal["ce_kd", "kd"] = "ce_kd"
    """``two_stage``'s second phase: CE + alpha_kd KD (as every method's Stage II), or KD alone
    (weight 1, T = distill.temperature), as the authors' script runs it."""
    hidden_fit: Literal["auto", "linear"] = "auto"
    """The map from student to teacher states: ``auto`` a learnable Linear when the widths differ
    and none when they are equal; ``linear`` always a learnable Linear (as LWD's)."""
    student_layer: int | None = None
    """0-based student block distilled (default: the last)."""
    teacher_layer: int | None = None
    """0-based teacher block it is matched with (default: the last)."""


# ------------------------------------------------------------------------------ the mixup draw
class MixupDraw:
    """lambda for each micro-batch, and the ramp r(t), drawn where the batch is made.

    One lambda per global micro-batch slot: every data-parallel rank draws all ``ranks`` lambdas of
    a slot group from the same seeded generator and keeps its own, so the lambdas (and the losses)
    do not depend on how the global batch is laid out over ranks and accumulation steps. The state
    (generator and global slots drawn) is checkpointed by the trainer; it resumes on any number of
    ranks.
    """

    def __init__(
        self,
        alpha: float,
        *,
        seed: int,
        rank: int,
        ranks: int,
        micro_batches_per_step: int,
        ramp: Literal["linear", "none"],
    ) -> None:
        self.alpha = alpha
        self.rank, self.ranks = rank, ranks
        self.micro_batches_per_step = micro_batches_per_step
        self.ramp = ramp
        self.total_steps: int | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.slots = 0  # global micro-batch slots drawn so far

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def __call__(self, input_ids: Tensor) -> dict[str, Any]:
        step = self.slots // (self.micro_batches_per_step * self.ranks)  # steps done before it
        ramp = 1.0
        if self.ramp == "linear" and self.total_steps is not None:
            ramp = step / self.total_steps
        # Every slot of the group in turn, so the stream does not depend on the number of ranks.
        lambdas = tuple(self._beta() if self.alpha > 0 else 1.0 for _ in range(self.ranks))
        self.slots += self.ranks
        # Every rank's lambda too: a teacher split apart mixes its group's micro-batches.
        return {"mix_lambda": lambdas[self.rank], "ramp": ramp, "slot_lambdas": lambdas}

    def _beta(self) -> float:
        """max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha) as a / (a + b) of two Gammas."""
        concentration = torch.tensor([self.alpha], dtype=torch.float64)
        a = torch._standard_gamma(concentration, generator=self.generator).item()
        b = torch._standard_gamma(concentration, generator=self.generator).item()
        if a + b == 0.0:  # both underflowed (tiny alpha), where Beta puts its mass on 0 and 1
            return 1.0
        return max(a / (a + b), b / (a + b))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "slots": self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.slots = state["slots"]


def mixed_token_embeddings(model: GPT, input_ids: Tensor, mix_lambda: float) -> Tensor:
    """lambda * wte(x) + (1 - lambda) * wte(x_rev) [B, T, d], x_rev = the batch reversed. The
    positions are the same in both: GPT-2 adds its (shared) position embeddings, so wpe mixes to
    itself; the Llama family rotates every block's q and k by position, mixed input or not."""
    tokens = model.wte(input_ids)
    if mix_lambda == 1.0:
        return tokens
    return mix_lambda * tokens + (1.0 - mix_lambda) * tokens.flip(0)


Relations = tuple[Tensor, Tensor, Tensor]
"""The Q-Q, K-K and V-V relations of one block, log-probabilities [B, h, T, T] for Q and
[B, h / kv_groups, T, T] for K and V (one per key/value head)."""


def qkv_relations(model: GPT, layer: int, out: GPTOutput) -> Relations:
    """Block ``layer``'s relations on the input it saw in ``out``: for X = Q [B, h, T, d_head]
    and K, V [B, h / kv_groups, T, d_head], log softmax(X X^T / sqrt(d_head)) over the causal keys,
    in fp32, -inf above the diagonal. Q and K are the ones the attention compares (after Qwen3's
    q/k norm and the rotation), and K and V are taken per key/value head, unrepeated
    (docs/design.md, "CR-ILD"). They are recomputed from the block's input (``ln_1`` and
    ``qkv_proj`` have no dropout, so they equal the block's own); under tensor parallelism
    ``qkv_proj`` yields this rank's [q_r; k_r; v_r], so these are this rank's heads."""
    attn = model.blocks[layer].attn
    x = out.embeddings if layer == 0 else out.hidden_states[layer - 1]
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    relations = []
    for t in attn.split_heads(attn.qkv_proj(model.blocks[layer].ln_1(x))):
        t = t.float()
        scores = (t @ t.transpose(-2, -1)) / math.sqrt(attn.head_dim)
        relations.append(scores.masked_fill(~causal, float("-inf")).log_softmax(dim=-1))
    return relations[0], relations[1], relations[2]


def _reads(layer: int, *, hidden: bool, attention: bool, qkv: bool) -> tuple[list[int], int]:
    """(blocks whose outputs the objects read, the last block that must run): the relations read
    block ``layer``'s input, so alone they stop one block earlier."""
    reads = [layer] if hidden or attention else []
    if qkv and layer > 0:
        reads.append(layer - 1)
    return sorted(reads), max(reads, default=layer)


# ------------------------------------------------------------------------------ the two sides
@dataclass
class MixedTapped(TappedOutputs):
    """The teacher's outputs on x_mix; ``attention_log_probs`` [B, n_head, T, T] and
    ``relations`` (``qkv_relations``) of block m."""

    attention_log_probs: Tensor | None = None
    relations: Relations | None = None


class MixupTapper(FrozenTapper):
    """The frozen teacher on x_mix, read at block ``layer`` (relations, hidden state and/or
    attention)."""

    def __init__(
        self,
        model: GPT,
        layer: int,
        *,
        hidden: bool,
        attention: bool,
        with_top: bool,
        qkv: bool = False,
    ) -> None:
        super().__init__(model, [layer] if hidden else [], with_top=with_top)
        self.layer = layer
        self.attention, self.qkv = attention, qkv
        self.reads, self.last = _reads(layer, hidden=hidden, attention=attention, qkv=qkv)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: Tensor,
        mix_lambda: float = 1.0,
        slot_lambdas: Sequence[float] = (),
        **_: Any,
    ) -> MixedTapped:
        """input_ids [B, T] mixed with ``mix_lambda``. A teacher split apart runs on its group's
        micro-batches together, each mixed with its own rank's lambda from ``slot_lambdas`` (by
        data rank: the student is unsplit, so a data rank is a global rank), and hands over this
        rank's rows with every head."""
        layout = self.model.tensor_parallel
        if layout is not None and layout.gathers_batch:
            members = dist.get_process_group_ranks(layout.group)
            parts = gather_batch(input_ids, layout).chunk(layout.size)
            embeds = torch.cat(
                [
                    mixed_token_embeddings(self.model, part, slot_lambdas[rank])
                    for part, rank in zip(parts, members, strict=True)
                ]
            )
        else:
            embeds = mixed_token_embeddings(self.model, input_ids, mix_lambda)
        out = self.model(
            None,
            inputs_embeds=embeds,
            output_layers=self.reads,
            attention_layer=self.layer if self.attention else None,
            return_logits=False,
            stop_after=None if self.with_top else self.last,
        )
        tapped = MixedTapped([out.hidden_states[i] for i in self.layers])
        tapped.attention_log_probs = out.attention_log_probs
        if self.qkv:
            tapped.relations = qkv_relations(self.model, self.layer, out)
        if self.with_top:
            tapped.last_hidden, tapped.head_weight = out.last_hidden, self.model.loss_head()[0]
        if layout is not None and layout.gathers_batch:
            config = self.model.config
            heads = config.layer_heads[self.layer]
            _keep_own_rows(tapped, layout, self.layer, heads, heads // config.kv_groups)
        return tapped


def _keep_own_rows(
    tapped: MixedTapped, layout: TensorParallelLayout, layer: int, heads: int, kv_heads: int
) -> None:
    """``tapped``, computed on the group's gathered batch over this rank's heads, cut in place to
    this rank's rows, per-head objects with all ``heads`` query (``kv_heads`` key/value) heads of
    block ``layer``."""
    replicas = layout.modules[f"blocks.{layer}.attn.qkv_proj"].kv_replicas
    tapped.layer_states = [own_rows(s, layout) for s in tapped.layer_states]
    if tapped.last_hidden is not None:
        tapped.last_hidden = own_rows(tapped.last_hidden, layout)
    if tapped.attention_log_probs is not None:
        tapped.attention_log_probs = own_rows_all_heads(tapped.attention_log_probs, layout, heads)
    if tapped.relations is not None:
        q, k, v = tapped.relations
        tapped.relations = (
            own_rows_all_heads(q, layout, heads),
            own_rows_all_heads(k, layout, kv_heads, replicas),
            own_rows_all_heads(v, layout, kv_heads, replicas),
        )


class MixupILD(nn.Module):
    """CR-ILD's trained side on x_mix: [mixed CE + alpha_kd * KD] + alpha_layer * (ILD + w_ic *
    r(t) * consistency). Without ``lm_loss`` (the ILD phase) only the bracketed layer term trains,
    with weight 1, and the student runs up to block ``layer`` only.

    fit: student width -> teacher width for the hidden MSE (``nn.Identity`` when they are equal).
    """

    def __init__(
        self,
        student: GPT,
        fit: nn.Module,
        settings: LossSettings,
        *,
        layer: int,
        hidden: bool,
        attention: bool,
        consistency_weight: float,
        lm_loss: bool,
        qkv: bool = False,
        alpha_kd: float = 0.0,
        alpha_layer: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.student = student
        self.fit = fit
        self.settings = settings
        self.layer = layer
        self.hidden, self.attention, self.qkv = hidden, attention, qkv
        self.reads, self.last = _reads(layer, hidden=hidden, attention=attention, qkv=qkv)
        self.consistency_weight = consistency_weight
        self.lm_loss = lm_loss
        self.alpha_kd = alpha_kd
        self.alpha_layer = alpha_layer
        self.temperature = temperature

    def _attention_kl(
        self, student_log_probs: Tensor, target_log_probs: Tensor, *, per_kv_head: bool = False
    ) -> Tensor:
        """``attention_kl`` averaged over all query heads (all key/value heads with
        ``per_kv_head``): under tensor parallelism each rank holds its own heads'
        distributions, and the mean runs over the group."""
        local = attention_kl(student_log_probs, target_log_probs)
        layout = self.student.tensor_parallel
        if layout is None:
            return local
        # The mean over this rank's heads as their sum, summed over the group, over the real
        # heads: padded heads attend uniformly in both models and add exactly zero.
        heads = self.student.config.layer_heads[self.layer]
        if per_kv_head:
            heads //= self.student.config.kv_groups
        return tensor_parallel_sum(local * student_log_probs.shape[1], layout) / heads

    def _relations_kl(self, student: Relations, target: Relations) -> Tensor:
        """The sum over Q, K, V of their relations' ``_attention_kl`` (K and V per key/value
        head)."""
        pairs = zip(student, target, (False, True, True), strict=True)
        return sum(self._attention_kl(s, t, per_kv_head=kv) for s, t, kv in pairs)

    def _run(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, *, to_top: bool):
        return self.student(
            input_ids,
            inputs_embeds=inputs_embeds,
            output_layers=self.reads,
            attention_layer=self.layer if self.attention else None,
            return_logits=False,
            stop_after=None if to_top else self.last,
        )

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        tapped: MixedTapped,
        mix_lambda: float = 1.0,
        ramp: float = 1.0,
        **_: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """input_ids, labels [B, T]; ``tapped`` the teacher on x_mix with the same ``mix_lambda``;
        ``ramp`` r(t). Both keywords come from ``MixupDraw`` (defaults: clean input, full ramp);
        its other draws are the teacher's."""
        lam = mix_lambda
        embeds = mixed_token_embeddings(self.student, input_ids, lam)
        out = self._run(None, embeds, to_top=self.lm_loss)
        parts: dict[str, Tensor] = {}
        loss = torch.zeros((), device=input_ids.device)
        if self.lm_loss:
            loss = lm_objective(
                self.student,
                out.last_hidden,
                labels,
                tapped,
                parts,
                self.settings,
                alpha_kd=self.alpha_kd,
                temperature=self.temperature,
                labels2=None if lam == 1.0 else labels.flip(0),
                mix=lam,
            )
        ild: list[Tensor] = []
        mixed_states: dict[str, Any] = {}
        if self.qkv:
            mixed_states["qkv"] = r = qkv_relations(self.student, self.layer, out)
            parts["loss_qkv"] = d = self._relations_kl(r, tapped.relations)
            ild.append(d)
        if self.hidden:
            mixed_states["hidden"] = h = out.hidden_states[self.layer]
            parts["loss_hidden"] = d = mse(self.fit(h), tapped.layer_states[0])
            ild.append(d)
        if self.attention:
            mixed_states["attention"] = a = out.attention_log_probs
            parts["loss_attention"] = d = self._attention_kl(a, tapped.attention_log_probs)
            ild.append(d)
        layer_loss = torch.stack(ild).sum()
        parts["loss_layer"] = layer_loss
        if self.consistency_weight > 0.0:
            consistency = self._consistency(input_ids, mixed_states, lam, parts)
            parts["loss_consistency"] = weighted = self.consistency_weight * ramp * consistency
            layer_loss = layer_loss + weighted
        loss = loss + self.alpha_layer * layer_loss
        return loss, {k: v.detach() for k, v in parts.items()}

    def _consistency(
        self, input_ids: Tensor, mixed: dict[str, Any], lam: float, parts: dict
    ) -> Tensor:
        """sum over objects of lambda D(S(x_mix), sg S(x)) + (1 - lambda) D(S(x_mix), sg S(x_rev));
        S(x_rev) is S(x) reversed along the batch, so one clean pass serves both."""
        with torch.no_grad():
            clean = self._run(input_ids, None, to_top=False)
            targets = {
                "hidden": clean.hidden_states.get(self.layer),
                "attention": clean.attention_log_probs,
                "qkv": qkv_relations(self.student, self.layer, clean) if self.qkv else None,
            }
        distance = {"hidden": mse, "attention": self._attention_kl, "qkv": self._relations_kl}
        terms = []
        for name, state in mixed.items():
            target, fn = targets[name], distance[name]
            reversed_ = tuple(t.flip(0) for t in target) if name == "qkv" else target.flip(0)
            term = lam * fn(state, target) + (1.0 - lam) * fn(state, reversed_)
            parts[f"loss_consistency_{name}"] = term
            terms.append(term)
        return torch.stack(terms).sum()


# ------------------------------------------------------------------------------ the method
def hidden_fit(section: CRILDConfig, d_s: int, d_t: int) -> nn.Module:
    """fit for the hidden-state MSE: a learnable Linear d_s -> d_t when ``hidden_fit: linear`` or
    the widths differ, else the identity (also when no hidden states are distilled)."""
    hidden = section.objects in ("hidden", "both")
    linear = section.hidden_fit == "linear" or d_s != d_t
    return nn.Linear(d_s, d_t) if hidden and linear else nn.Identity()


@register
class CRILD(Method):
    name = "cr_ild"
    model_families = FAMILIES  # relations of the heads the attention compares (docs/design.md)
    # Its per-head sums over a group are not built for split or copied key/value heads.
    tensor_parallel_families = ("gpt2",)
    teacher_apart = True
    section = ("cr_ild", CRILDConfig)

    def extra_modules(
        self, config, teacher: GPT, student: GPT, layer_map: list[int]
    ) -> ExtraModules:
        # The ILD phase's fit layer (the larger phase for memory: it also holds the fit's input).
        fit = hidden_fit(config.cr_ild, student.config.n_embd, teacher.config.n_embd)
        if isinstance(fit, nn.Identity):
            return ExtraModules()
        return ExtraModules(trained=fit, tapped_layers=1)

    def plan(self, config) -> list[PlannedPhase]:
        if config.cr_ild.stages == "joint":
            return [PlannedPhase("joint", "distill")]
        # The ILD phase prepares the student that logit KD then trains: Stage I and II.
        return [PlannedPhase("ild", "filters"), PlannedPhase("stage2", "distill")]

    def build(self, phase: str, ctx: MethodContext) -> Phase:
        if phase == "stage2":
            return self._logit_kd(phase, ctx)
        return self._ild(phase, ctx, joint=phase == "joint")

    @staticmethod
    def _layers(ctx: MethodContext) -> tuple[int, int]:
        """(student block k, teacher block m), checked against both depths."""
        section = ctx.config.cr_ild
        pair = []
        for key, chosen, model in (
            ("student_layer", section.student_layer, ctx.student),
            ("teacher_layer", section.teacher_layer, ctx.teacher),
        ):
            depth = model.config.n_layer
            index = depth - 1 if chosen is None else chosen
            if not 0 <= index < depth:
                raise ModelMismatchError(
                    f"cr_ild.{key}={chosen}: the {key.split('_')[0]} has blocks 0..{depth - 1}"
                )
            pair.append(index)
        return pair[0], pair[1]

    @staticmethod
    def _ild_path(ctx: MethodContext) -> Path:
        return ctx.run_dir / "ild_student.safetensors"

    def _ild(self, name: str, ctx: MethodContext, *, joint: bool) -> Phase:
        config, teacher = ctx.config, ctx.teacher
        section = config.cr_ild
        k, m = self._layers(ctx)
        qkv = section.objects == "qkv"
        hidden = section.objects in ("hidden", "both")
        attention = section.objects in ("attention", "both")
        s_cfg, t_cfg = ctx.student.config, teacher.config
        if qkv or attention:
            _check_heads(section.objects, (s_cfg, k), (t_cfg, m), key_value=qkv)
        fit = hidden_fit(section, s_cfg.n_embd, t_cfg.n_embd).to(ctx.device)
        student = ctx.student.to(ctx.device)
        alpha_kd = config.distill.alpha_kd if joint else 0.0
        trained = MixupILD(
            student,
            fit,
            ctx.loss_settings,
            layer=k,
            hidden=hidden,
            attention=attention,
            qkv=qkv,
            consistency_weight=section.consistency_weight,
            lm_loss=joint,
            alpha_kd=alpha_kd,
            alpha_layer=config.distill.alpha_layer if joint else 1.0,
            temperature=config.distill.temperature,
        )
        tapper = MixupTapper(
            teacher, m, hidden=hidden, attention=attention, qkv=qkv, with_top=alpha_kd > 0
        )
        batch = config.batch
        draw = MixupDraw(
            section.mixup_alpha,
            seed=config.seed,
            rank=ctx.data_rank,
            ranks=ctx.data_ranks,
            micro_batches_per_step=batch.global_batch_size
            // (batch.micro_batch_size * ctx.data_ranks),
            ramp=section.consistency_ramp,
        )

        s_last, t_last = trained.last, tapper.last

        def flops_per_token(seq_len: int) -> float:
            if joint:
                total = student_flops(ctx, seq_len, kd=alpha_kd > 0)
            else:  # both trunks up to the blocks the objects read, no heads
                t_trunk = forward_flops(teacher.blocks[: t_last + 1], seq_len)
                total = FROZEN * t_trunk * batch_factor(teacher)
                total += TRAINED * forward_flops(student.blocks[: s_last + 1], seq_len)
            total += TRAINED * forward_flops(fit, seq_len)
            if qkv:  # the recomputed Q, K, V projections, and X X^T for each
                t_rel = _relations_flops(teacher, m, seq_len) * batch_factor(teacher)
                total += FROZEN * t_rel + TRAINED * _relations_flops(student, k, seq_len)
            if section.consistency_weight > 0:  # the clean-input student pass, no backward
                total += FROZEN * forward_flops(student.blocks[: s_last + 1], seq_len)
                total += FROZEN * _relations_flops(student, k, seq_len) if qkv else 0.0
            return total

        def finish() -> None:
            if joint:
                ctx.export(student, "student_hf")
                return

            def write(state: dict) -> None:
                atomic_write_bytes(self._ild_path(ctx), save(_contiguous(state)))
                ctx.log(f"ILD student saved to {self._ild_path(ctx)}")

            ctx.save_on_main(student, write)

        return Phase(
            name,
            trained,
            tapper,
            config.stage2 if joint else config.stage1,
            flops_per_token,
            evaluated=student,
            finish=finish,
            batch_draw=draw,
        )

    def _logit_kd(self, name: str, ctx: MethodContext) -> Phase:
        """Stage 2 on clean inputs, from the student the ILD phase saved: CE + alpha_kd * KD, or
        KD alone (``stage2_loss: kd``); KD the T^2-scaled KL at distill.temperature."""
        config = ctx.config
        path = self._ild_path(ctx)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ILD student at {path}: run the ild phase first (stage: filters or all)"
            )
        student = GPT(
            ctx.student.config,
            attention=config.model.attention,
            activation_checkpointing=config.model.activation_checkpointing,
        )
        load_state_checked(student, read_safetensors(path)[0], source=str(path))
        student = ctx.place(student.train().requires_grad_(True), "student")
        kd_only = config.cr_ild.stage2_loss == "kd"
        kd = kd_only or config.distill.alpha_kd > 0
        # KD alone is the authors' second stage; otherwise CE + alpha_kd * KD.
        trained = ctx.distillation(student=student, with_ce=not kd_only)
        return Phase(
            name,
            trained,
            FrozenTapper(ctx.teacher, [], with_top=True) if kd else None,
            config.stage2,
            lambda seq_len: student_flops(ctx, seq_len, kd=kd),
            evaluated=student,
            finish=lambda: ctx.export(student, "student_hf"),
        )


def _check_heads(
    objects: str,
    student: tuple[GPTConfig, int],
    teacher: tuple[GPTConfig, int],
    *,
    key_value: bool,
) -> None:
    """Refuse, naming both counts, distilled blocks (config, block index) whose per-head
    distributions cannot be paired head by head: query heads always (attention, Q-Q relations),
    key/value heads too for the K-K and V-V relations (``key_value``). Widths and head widths may
    differ: every distribution is T x T."""
    (s_cfg, k), (t_cfg, m) = student, teacher
    s_heads, t_heads = s_cfg.layer_heads[k], t_cfg.layer_heads[m]
    counts = [("heads", s_heads, t_heads)]
    if key_value:
        counts.append(("key/value heads", s_heads // s_cfg.kv_groups, t_heads // t_cfg.kv_groups))
    for what, s, t in counts:
        if s != t:
            raise ModelMismatchError(
                f"cr_ild.objects={objects} compares per-head distributions head by head: the "
                f"student's block {k} has {s} {what}, the teacher's block {m} {t} "
                '(docs/design.md, "CR-ILD")'
            )


def _relations_flops(model: GPT, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of ``qkv_relations`` on block ``layer``: its ``qkv_proj`` again,
    and X X^T for Q, K and V (2 T d_head FLOPs per token and head, query or key/value: 2 T per
    ``qkv_proj`` output row; this rank's heads)."""
    proj = model.blocks[layer].attn.qkv_proj
    return forward_flops(proj, seq_len) + 2 * seq_len * proj.weight.shape[0]


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
