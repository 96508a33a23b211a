"""The two sides of distillation as modules, shared by the methods.

``FrozenTapper`` runs a frozen model (and whatever frozen transform a method puts on its states)
under inference mode and hands over what the losses need; it is never part of the optimizer or of
ZeRO's partitions. ``StudentDistillation`` is what the DeepSpeed engine wraps for a student phase:
all of its parameters train, and it computes its whole loss inside ``forward`` so that ZeRO-3
gathers every partitioned weight the loss touches. Methods configure both; neither names a method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ted_scale.distill.filters import FilterBank
from ted_scale.distill.objectives import (
    LossSettings,
    Reduction,
    combine_layers,
    cross_entropy,
    cross_entropy_and_kd,
    logit_distillation,
)
from ted_scale.model.gpt import GPT
from ted_scale.model.tp_layout import TensorParallelLayout


@dataclass
class TappedOutputs:
    """What a frozen model hands to the trained side for one micro-batch.

    layer_states: K tensors [B, T, d_t] read at the tapped blocks (after the method's transform).
    last_hidden: final-normed top hidden state [B, T, d_t] for KD (None when not needed).
    head_weight: the frozen model's LM head [V, d_t] (None when not needed).
    """

    layer_states: list[Tensor] = field(default_factory=list)
    last_hidden: Tensor | None = None
    head_weight: Tensor | None = None


StateTransform = Callable[[list[Tensor]], list[Tensor]]


class BatchDraw(Protocol):
    """Per-micro-batch random choices (mixup's lambda, ...) made where the batch is made, in batch
    order, so that the frozen side (run ahead when prefetching) and the trained side see the same
    ones. ``TeacherFeed`` calls it once per micro-batch and passes what it returns as keyword
    arguments to both the tapper and the trained module's ``forward``; the trainer checkpoints its
    state as of the last batch the trained side got, so a resumed run draws what it would have."""

    def __call__(self, input_ids: Tensor) -> dict[str, Any]:
        """The draw for ``input_ids`` [B, T] (this rank's micro-batch)."""
        ...

    def start(self, total_steps: int) -> None:
        """Called before the phase's first step with its length in optimizer steps."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FrozenTapper:
    """A frozen model read at chosen blocks, its states optionally passed through a frozen
    ``transform`` (TED's teacher filters, for example).

    with_top: also hand over the final-normed top state and the LM head (for KD).
    with_embeddings: put the embeddings (block 0's input) first in ``layer_states``.

    A teacher split apart from its student (``TensorParallelLayout.gathers_batch``) runs on its
    group's micro-batches together (one all-gather of the token ids, one sharded forward) and
    hands over this rank's rows and its whole head.
    """

    def __init__(
        self,
        model: GPT,
        layers: Sequence[int],
        *,
        transform: StateTransform | None = None,
        with_top: bool = False,
        with_embeddings: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.layers = list(layers)
        self.transform = transform
        self.with_top = with_top
        self.with_embeddings = with_embeddings

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor) -> TappedOutputs:
        layout = self.model.tensor_parallel
        gathers = layout is not None and layout.gathers_batch
        out = self.model(
            gather_batch(input_ids, layout) if gathers else input_ids,
            output_layers=self.layers,
            return_logits=False,
            stop_after=max(self.layers) if self.layers and not self.with_top else None,
        )
        states = [out.hidden_states[i] for i in self.layers]
        if self.with_embeddings:
            states.insert(0, out.embeddings)
        last_hidden = out.last_hidden
        if gathers:  # this rank's rows, before the transform: it is per token
            states = [own_rows(s, layout) for s in states]
            last_hidden = None if last_hidden is None else own_rows(last_hidden, layout)
        if self.transform is not None:
            states = self.transform(states)
        if not self.with_top:
            return TappedOutputs(layer_states=states)
        return TappedOutputs(states, last_hidden, self.model.loss_head()[0])


def gather_batch(input_ids: Tensor, layout: TensorParallelLayout) -> Tensor:
    """[B, T] of each rank of the layout's group -> [size * B, T], in rank order."""
    parts = [torch.empty_like(input_ids) for _ in range(layout.size)]
    dist.all_gather(parts, input_ids.contiguous(), group=layout.group)
    return torch.cat(parts)


def own_rows(t: Tensor, layout: TensorParallelLayout) -> Tensor:
    """This rank's micro-batch of a [size * B, ...] tensor computed on the gathered batch: a copy,
    so that the group's whole tensor is freed rather than kept alive by a view."""
    rows = t.shape[0] // layout.size
    return t[layout.rank * rows : (layout.rank + 1) * rows].clone()


def own_rows_all_heads(
    t: Tensor, layout: TensorParallelLayout, heads: int, replicas: int = 1
) -> Tensor:
    """[size * B, h_r, ...] per-head tensor of the gathered batch, this rank's heads (h_r, the
    same on every rank) -> [B, heads, ...]: this rank's rows with the group's heads in order, the
    padded ones (past ``heads``, on the last ranks) cut. One all-to-all: rank j's rows of each
    rank's heads go to rank j. ``replicas``: consecutive ranks holding a copy of the same heads
    (key/value heads replicated over a group that outnumbers them); one copy is kept."""
    rows = t.shape[0] // layout.size
    received = torch.empty_like(t)
    dist.all_to_all_single(received, t.contiguous(), group=layout.group)
    # [size (the sender, whose heads these are), B, h_r, ...] -> [B, size * h_r, ...]
    received = received.unflatten(0, (layout.size, rows))[::replicas].transpose(0, 1)
    return received.flatten(1, 2)[:, :heads].contiguous()


def lm_objective(
    student: GPT,
    top: Tensor,
    labels: Tensor,
    tapped: TappedOutputs | None,
    parts: dict[str, Tensor],
    settings: LossSettings,
    *,
    alpha_kd: float,
    temperature: float,
    with_ce: bool = True,
    labels2: Tensor | None = None,
    mix: float = 1.0,
) -> Tensor:
    """CE + alpha_kd * KD on the student's final-normed top state ``top`` [B, T, d] through its
    head, KD against the tapped teacher top (no KD when alpha_kd is 0; KD alone, at weight 1,
    without ``with_ce``). With ``labels2`` the CE is mix * CE(labels) + (1 - mix) * CE(labels2)
    from one logits pass. Adds the detached ``loss_ce`` (and ``loss_kd``) to ``parts``."""
    weight, shard = student.loss_head()
    if not with_ce:
        loss = logit_distillation(
            top, weight, tapped.last_hidden, tapped.head_weight, labels, settings,
            temperature=temperature, shard=shard,
        )  # fmt: skip
        parts["loss_kd"] = loss.detach()
        return loss
    if alpha_kd == 0.0:
        loss = cross_entropy(top, weight, labels, settings, shard=shard, labels2=labels2, mix=mix)
        parts["loss_ce"] = loss.detach()
        return loss
    loss, parts["loss_ce"], parts["loss_kd"] = cross_entropy_and_kd(
        top,
        weight,
        labels,
        tapped.last_hidden,
        tapped.head_weight,
        settings,
        temperature=temperature,
        alpha_kd=alpha_kd,
        shard=shard,
        labels2=labels2,
        mix=mix,
    )
    return loss


LayerDistance = Callable[[list[Tensor], TappedOutputs, Tensor], list[Tensor]]
"""(student states after the layer modules, the teacher's tapped outputs, labels [B, T]) -> one
scalar distance per layer."""


class StudentDistillation(nn.Module):
    """A student phase's trained side: CE + alpha_kd * KD + alpha_layer * D.

    D combines ``layer_distance`` over the student's blocks 0..K-1, each first mapped by its layer
    module (student filters, LWD projections). Without ``layer_modules`` there is no D; with
    ``alpha_kd`` 0 (or nothing tapped at the top) there is no KD: plain next-token CE; without
    ``with_ce`` the objective is KD alone (CR-ILD's second stage). With D, ``parts`` also holds
    ``layer_to_ce`` = alpha_layer * D / CE.
    """

    def __init__(
        self,
        student: GPT,
        settings: LossSettings,
        *,
        layer_modules: FilterBank | None = None,
        layer_distance: LayerDistance | None = None,
        alpha_kd: float = 0.0,
        alpha_layer: float = 0.0,
        temperature: float = 1.0,
        layer_reduction: Reduction = "mean",
        with_ce: bool = True,
    ) -> None:
        super().__init__()
        if (layer_modules is None) != (layer_distance is None):
            raise ValueError("layer_modules and layer_distance come together")
        if layer_modules is not None and not with_ce:
            raise ValueError("a layer term needs CE: its layer_to_ce ratio is taken against it")
        self.student = student
        self.settings = settings
        self.layer_modules = layer_modules
        self.layer_distance = layer_distance
        self.alpha_kd = alpha_kd
        self.alpha_layer = alpha_layer
        self.temperature = temperature
        self.layer_reduction = layer_reduction
        self.with_ce = with_ce

    def forward(
        self, input_ids: Tensor, labels: Tensor, tapped: TappedOutputs | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n_layers = len(self.layer_modules.layers) if self.layer_modules is not None else 0
        out = self.student(input_ids, output_layers=range(n_layers), return_logits=False)
        parts: dict[str, Tensor] = {}
        loss = lm_objective(
            self.student,
            out.last_hidden,
            labels,
            tapped,
            parts,
            self.settings,
            alpha_kd=self.alpha_kd,
            temperature=self.temperature,
            with_ce=self.with_ce,
        )
        if self.layer_modules is None:
            return loss, parts
        student_states = self.layer_modules([out.hidden_states[k] for k in range(n_layers)])
        per_layer = self.layer_distance(student_states, tapped, labels)
        distance = combine_layers(per_layer, self.layer_reduction)
        parts["loss_layer"] = distance.detach()
        parts.update({f"loss_layer_{k}": d.detach() for k, d in enumerate(per_layer)})
        # The weighted layer term's size against CE: a device tensor like the other parts, read
        # only at the log interval (no host sync here).
        parts["layer_to_ce"] = self.alpha_layer * parts["loss_layer"] / parts["loss_ce"]
        return loss + self.alpha_layer * distance, parts
