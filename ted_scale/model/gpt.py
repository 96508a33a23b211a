"""GPT-2 as one readable file: pre-LayerNorm blocks, learned positions, tanh-GELU, tied embeddings.

Blocks may differ in shape (a pruned model, docs/design.md "Models of non-uniform shape"): block l
has its own head count h_l, each head ``head_dim = n_embd / n_head`` wide, and its own FFN width.

Projection names are chosen so tensor parallelism can shard them by name:
``attn.qkv_proj`` (column-parallel; its output rows are [q; k; v], each ``h_l * head_dim`` wide,
head by head), ``attn.out_proj`` (row-parallel), ``mlp.up_proj`` (column-parallel),
``mlp.down_proj`` (row-parallel).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ted_scale.kernels.vocab_parallel import VocabShard
from ted_scale.model.attention import causal_attention, causal_attention_with_log_probs
from ted_scale.model.tp_layout import TensorParallelLayout


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model (names follow HF's ``GPT2Config``).

    ``n_head`` fixes the head width ``head_dim = n_embd / n_head``; a pruned model keeps fewer heads
    in some blocks (``n_head_per_layer``) and narrower FFNs (``n_inner_per_layer``).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None
    """FFN width of every block (HF's name); null = 4 * n_embd."""
    n_head_per_layer: list[int] | None = None
    """Heads of each block, each in 0..n_head (a pruned model); null = n_head in every block."""
    n_inner_per_layer: list[int] | None = None
    """FFN width of each block, each >= 0 (a pruned model); null = n_inner in every block."""

    def __post_init__(self) -> None:
        # Checked here, not as config bounds: HF folders' config.json build this class too.
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_epsilon > 0.0:  # also refuses NaN
            raise ValueError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner < 0:
            raise ValueError(f"n_inner ({self.n_inner}) must be >= 0")
        for name, upper in (("n_head_per_layer", self.n_head), ("n_inner_per_layer", None)):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.n_layer:
                raise ValueError(
                    f"{name} has {len(values)} entries but n_layer is {self.n_layer}: {values}"
                )
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{name}[{i}] = {v!r} must be an integer >= 0")
                if upper is not None and v > upper:
                    raise ValueError(f"{name}[{i}] = {v} exceeds n_head ({upper})")
            setattr(self, name, list(values))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def layer_heads(self) -> tuple[int, ...]:
        """Heads of each block."""
        return tuple(self.n_head_per_layer or [self.n_head] * self.n_layer)

    @property
    def layer_inner(self) -> tuple[int, ...]:
        """FFN width of each block."""
        width = 4 * self.n_embd if self.n_inner is None else self.n_inner
        return tuple(self.n_inner_per_layer or [width] * self.n_layer)


# Per-block tensors whose width follows the block's heads or FFN neurons:
# name suffix -> (dimension, equal groups along it ([q; k; v] is 3), "heads" | "inner").
SHAPED_TENSORS = {
    "attn.qkv_proj.weight": (0, 3, "heads"),
    "attn.qkv_proj.bias": (0, 3, "heads"),
    "attn.out_proj.weight": (1, 1, "heads"),
    "mlp.up_proj.weight": (0, 1, "inner"),
    "mlp.up_proj.bias": (0, 1, "inner"),
    "mlp.down_proj.weight": (1, 1, "inner"),
}


@dataclass(frozen=True)
class Subnet:
    """A prefix sub-network: block l keeps its first ``heads[l]`` heads and ``inner[l]`` neurons.

    Passed to :meth:`GPT.forward`, it runs that sub-network on the shared weights (no copy), so
    many candidates of one model can be trained together; ``pruning.extract`` copies it out.
    """

    heads: tuple[int, ...]
    inner: tuple[int, ...]

    def check(self, config: GPTConfig) -> None:
        """Raise ValueError unless this fits inside a model of shape ``config``."""
        for name, have, limit in (
            ("heads", self.heads, config.layer_heads),
            ("inner", self.inner, config.layer_inner),
        ):
            if len(have) != len(limit):
                raise ValueError(
                    f"subnet {name} has {len(have)} layers but the model has {len(limit)}"
                )
            for i, (h, n) in enumerate(zip(have, limit, strict=True)):
                if not 0 <= h <= n:
                    raise ValueError(f"subnet {name}[{i}] = {h} outside 0..{n} (the model's)")

    def apply_to(self, config: GPTConfig) -> GPTConfig:
        """The config of the dense model holding just this sub-network."""
        return replace(
            config, n_head_per_layer=list(self.heads), n_inner_per_layer=list(self.inner)
        )


@dataclass
class GPTOutput:
    """What a forward pass returns.

    hidden_states: block index (0-based) -> residual stream after that block, [B, T, n_embd].
    embeddings: token + position embeddings after dropout (block 0's input), [B, T, n_embd].
    last_hidden: final LayerNorm output, [B, T, n_embd] (the LM head's input).
    logits: [B, T, vocab_size], or None when the caller fuses the LM head into its loss.
    attention_log_probs: the ``attention_layer`` block's attention log-probabilities
        [B, n_head, T, T] (-inf above the diagonal), or None.
    """

    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    embeddings: Tensor | None = None
    last_hidden: Tensor | None = None
    logits: Tensor | None = None
    attention_log_probs: Tensor | None = None


class PrefixLinear(nn.Linear):
    """``nn.Linear`` that can run on a prefix of its features: of its outputs (``dim=0``), in each
    of ``groups`` equal parts (qkv's [q; k; v]), or of its inputs (``dim=1``).

    The slicing happens in this module's own forward, so an engine that gathers a module's weights
    around its forward (ZeRO-3) sees them whole. A zero-width layer (fully pruned) is allowed.
    """

    def __init__(self, d_in: int, d_out: int, *, dim: int = 0, groups: int = 1) -> None:
        with warnings.catch_warnings():  # a zero-width weight's initialisation is a no-op
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            super().__init__(d_in, d_out)
        self.dim = dim
        self.groups = groups

    def forward(self, x: Tensor, keep: int | None = None) -> Tensor:
        """x [..., d_in] -> [..., d_out]; with ``keep``, only the first ``keep`` features (per
        group) of the sliced side take part: [..., groups * keep] out, or [..., keep] in."""
        full = self.in_features if self.dim == 1 else self.out_features // self.groups
        if keep is None or keep == full:
            return super().forward(x)
        if self.dim == 1:
            return F.linear(x, self.weight[:, :keep], self.bias)
        w = self.weight.view(self.groups, full, self.in_features)[:, :keep]
        b = self.bias.view(self.groups, full)[:, :keep]
        return F.linear(x, w.reshape(-1, self.in_features), b.reshape(-1))


def _project(proj: PrefixLinear, x: Tensor, keep: int | None) -> Tensor:
    """``proj(x)``, on a prefix of ``keep`` features when given. The whole-model path calls the
    module with ``x`` alone, as an engine that replaces projections by name expects."""
    return proj(x) if keep is None else proj(x, keep)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``n_head`` heads of width ``head_dim`` (``n_head`` may be 0)."""

    def __init__(self, config: GPTConfig, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = config.head_dim
        width = n_head * config.head_dim
        self.qkv_proj = PrefixLinear(config.n_embd, 3 * width, groups=3)
        self.out_proj = PrefixLinear(width, config.n_embd, dim=1)
        self.attn_dropout = config.dropout
        # Where the attention-probability dropout draws its masks: the default stream, or a
        # per-rank one when tensor parallelism shards the heads (set by ``parallelize_gpt``).
        self.dropout_rng: Callable[[], AbstractContextManager[None]] = nullcontext
        self.resid_dropout = nn.Dropout(config.dropout)
        self.implementation = "auto"

    def forward(
        self,
        x: Tensor,
        n_active: int | None = None,
        head_mask: Tensor | None = None,
        *,
        return_log_probs: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, T, C] -> [B, T, C], using the first ``n_active`` heads (default all);
        ``head_mask`` [n_head] scales each head's output (its first ``n_active`` entries used).
        With ``return_log_probs`` also the attention log-probabilities [B, h, T, T], computed by
        the explicit softmax path."""
        B, T, _ = x.shape
        keep = None if n_active in (None, self.n_head) else n_active * self.head_dim
        qkv = _project(self.qkv_proj, x, keep)
        # The heads present, read off the output: a projection sharded by heads into
        # [q_r; k_r; v_r] per rank (tensor parallelism) gives this rank's heads.
        h = qkv.shape[-1] // (3 * self.head_dim)
        if h == 0:
            # No heads (here): the sublayer adds only its output bias. y is cut from qkv, not
            # made anew, so that the backward still runs through qkv_proj: a tensor-parallel
            # rank holding none of a sub-network's heads joins its peers' collectives there.
            y, log_probs = qkv[..., :0], x.new_zeros(B, 0, T, T)
        else:
            q, k, v = qkv.split(h * self.head_dim, dim=2)
            # [B, T, h * head_dim] -> [B, h, T, head_dim]
            q, k, v = (t.view(B, T, h, self.head_dim).transpose(1, 2) for t in (q, k, v))
            dropout_p = self.attn_dropout if self.training else 0.0
            with self.dropout_rng() if dropout_p > 0 else nullcontext():
                if return_log_probs:
                    y, log_probs = causal_attention_with_log_probs(q, k, v, dropout_p=dropout_p)
                else:
                    y = causal_attention(
                        q, k, v, dropout_p=dropout_p, implementation=self.implementation
                    )
            if head_mask is not None:
                y = y * head_mask[:h].view(1, h, 1, 1).to(y.dtype)
            y = y.transpose(1, 2).reshape(B, T, h * self.head_dim)
        out = self.resid_dropout(_project(self.out_proj, y, keep))
        return (out, log_probs) if return_log_probs else out


class MLP(nn.Module):
    """The FFN with ``n_inner`` neurons (``n_inner`` may be 0: it then adds only its output bias)."""

    def __init__(self, config: GPTConfig, n_inner: int) -> None:
        super().__init__()
        self.n_inner = n_inner
        self.up_proj = PrefixLinear(config.n_embd, n_inner)
        self.down_proj = PrefixLinear(n_inner, config.n_embd, dim=1)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, n_active: int | None = None, neuron_mask: Tensor | None = None
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C], using the first ``n_active`` neurons (default all);
        ``neuron_mask`` [n_inner] scales each neuron's activation (first ``n_active`` used)."""
        keep = None if n_active == self.n_inner else n_active
        a = F.gelu(_project(self.up_proj, x, keep), approximate="tanh")
        if neuron_mask is not None:
            a = a * neuron_mask[: a.shape[-1]].to(a.dtype)
        return self.dropout(_project(self.down_proj, a, keep))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, config.layer_heads[layer])
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, config.layer_inner[layer])

    def forward(
        self,
        x: Tensor,
        n_heads: int | None = None,
        n_inner: int | None = None,
        head_mask: Tensor | None = None,
        neuron_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C]; the optional arguments as in ``GPT.forward``, for this block."""
        x = x + self.attn(self.ln_1(x), n_heads, head_mask)
        return x + self.mlp(self.ln_2(x), n_inner, neuron_mask)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The whole block on x [B, T, C], with its attention log-probabilities [B, n_head, T, T]
        (the explicit softmax path: used for the one block whose attention a loss reads)."""
        attended, log_probs = self.attn(self.ln_1(x), return_log_probs=True)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), log_probs


class GPT(nn.Module):
    """GPT-2 language model.

    ``attention`` picks the kernel: ``auto`` (flash-attn 2 for fp16/bf16 CUDA inputs when installed,
    otherwise SDPA), ``sdpa``, ``flash`` or ``eager`` (the plain reference).
    """

    def __init__(
        self,
        config: GPTConfig,
        *,
        attention: str = "auto",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.activation_checkpointing = activation_checkpointing
        self.tensor_parallel: TensorParallelLayout | None = None
        """How the model is sharded (set by ``parallelize_gpt``); None when it is whole."""
        self.set_attention(attention)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at initialisation.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head, tied to the token embedding: [vocab_size, n_embd]."""
        return self.wte.weight

    @property
    def vocab_shard(self) -> VocabShard | None:
        """This rank's vocabulary rows of the LM head under tensor parallelism, else None."""
        return None if self.tensor_parallel is None else self.tensor_parallel.vocab

    def loss_head(self) -> tuple[Tensor, VocabShard | None]:
        """The LM head [V(_r), d] the losses use, with its vocabulary shard: the head itself (this
        rank's rows under tensor parallelism), or the whole head a teacher split apart from its
        student keeps (``TensorParallelLayout.whole_head``), unsharded."""
        layout = self.tensor_parallel
        if layout is not None and layout.whole_head is not None:
            return layout.whole_head, None
        return self.lm_head_weight, self.vocab_shard

    def set_attention(self, implementation: str) -> None:
        for block in self.blocks:
            block.attn.implementation = implementation

    def lm_head(self, normed_hidden: Tensor) -> Tensor:
        """[..., n_embd] -> logits [..., vocab_size]."""
        return F.linear(normed_hidden, self.wte.weight)

    def head(self, hidden: Tensor) -> Tensor:
        """The full task head applied to a residual-stream state: final LayerNorm, then LM head."""
        return self.lm_head(self.ln_f(hidden))

    def forward(
        self,
        input_ids: Tensor | None,
        *,
        inputs_embeds: Tensor | None = None,
        output_layers: Sequence[int] = (),
        attention_layer: int | None = None,
        return_logits: bool = True,
        stop_after: int | None = None,
        subnet: Subnet | None = None,
        head_mask: Sequence[Tensor] | None = None,
        neuron_mask: Sequence[Tensor] | None = None,
    ) -> GPTOutput:
        """Run the model on ``input_ids`` [B, T], or on given token embeddings.

        inputs_embeds: [B, T, n_embd] used in place of the token embeddings of ``input_ids``
            (which must then be None); position embeddings are added as usual.
        output_layers: 0-based block indices whose residual-stream outputs are returned.
        attention_layer: a block whose attention log-probabilities are returned (that block runs
            the explicit softmax path; the others keep the configured kernel).
        return_logits: compute logits [B, T, V]; pass False when the loss fuses the LM head.
        stop_after: skip every block after this index (and the final LayerNorm and head).
        subnet: run only this prefix sub-network of the shared weights (docs/design.md).
        head_mask: per block, [heads of that block] factors on each head's output.
        neuron_mask: per block, [FFN width of that block] factors on each neuron's activation.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        tokens = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        T = tokens.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions={self.config.n_positions}")
        wanted = set(output_layers)
        checked = wanted | ({attention_layer} if attention_layer is not None else set())
        if checked and (min(checked) < 0 or max(checked) >= len(self.blocks)):
            raise ValueError(f"output_layers {sorted(checked)} outside 0..{len(self.blocks) - 1}")
        if subnet is not None:
            subnet.check(self.config)
        if attention_layer is not None and (subnet or head_mask or neuron_mask):
            raise ValueError("attention_layer does not combine with subnet or masks")
        _check_masks("head_mask", head_mask, self.config.layer_heads)
        _check_masks("neuron_mask", neuron_mask, self.config.layer_inner)
        positions = torch.arange(T, device=tokens.device)
        x = self.drop(tokens + self.wpe(positions))
        out = GPTOutput(embeddings=x)
        for i, block in enumerate(self.blocks):
            if i == attention_layer:
                run, args = block.forward_with_attention, (x,)
            else:
                run = block
                args = (
                    x,
                    None if subnet is None else subnet.heads[i],
                    None if subnet is None else subnet.inner[i],
                    None if head_mask is None else head_mask[i],
                    None if neuron_mask is None else neuron_mask[i],
                )
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                result = checkpoint(run, *args, use_reentrant=False)
            else:
                result = run(*args)
            if i == attention_layer:
                x, out.attention_log_probs = result
            else:
                x = result
            if i in wanted:
                out.hidden_states[i] = x
            if stop_after is not None and i >= stop_after:
                return out
        out.last_hidden = self.ln_f(x)
        if return_logits:
            out.logits = self.lm_head(out.last_hidden)
        return out

    def num_params(self, *, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel()
        return n


def _check_masks(name: str, masks: Sequence[Tensor] | None, widths: Sequence[int]) -> None:
    if masks is None:
        return
    if len(masks) != len(widths):
        raise ValueError(f"{name} has {len(masks)} entries but the model has {len(widths)} blocks")
    for i, (m, w) in enumerate(zip(masks, widths, strict=True)):
        if tuple(m.shape) != (w,):
            raise ValueError(f"{name}[{i}] has shape {tuple(m.shape)}, expected ({w},)")
