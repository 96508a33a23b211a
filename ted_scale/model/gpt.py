"""One pre-norm decoder as one readable file: GPT-2 and the Llama family (Llama, Mistral, Qwen2,
Qwen3), which ``GPTConfig.family`` tells apart.

- GPT-2: LayerNorm, learned positions, tanh-GELU FFN, biases everywhere, tied embeddings.
- The Llama family: RMSNorm, rotary positions (RoPE; Llama 3's frequency scaling), SwiGLU FFN
  (``down(silu(gate(x)) * up(x))``), grouped-query attention (``n_kv_head`` key/value heads shared
  by ``n_head / n_kv_head`` query heads each), optional q/k/v bias (Qwen2), optional RMSNorm of
  each head's q and k (Qwen3), tied or untied LM head.

Blocks may differ in shape (a pruned model, docs/design.md "Models of non-uniform shape"): block l
has its own head count h_l, each head ``head_dim`` wide (in the Llama family a whole number of
key/value groups), and its own FFN width.

Projection names are chosen so tensor parallelism can shard them by name:
``attn.qkv_proj`` (column-parallel; its output rows are [q; k; v]: ``h_l * head_dim`` rows of q,
then ``h_l / kv_groups * head_dim`` of k and of v, each head by head; GPT-2 has as many k and v
heads as q heads), ``attn.out_proj`` (row-parallel), ``mlp.up_proj`` (column-parallel), ``mlp.down_proj``
(row-parallel); SwiGLU adds ``mlp.gate_proj`` (shaped as ``up_proj``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ted_scale.kernels.vocab_parallel import VocabShard
from ted_scale.model.attention import causal_attention, causal_attention_with_log_probs
from ted_scale.model.tp_layout import TensorParallelLayout

Family = Literal["gpt2", "llama", "mistral", "qwen2", "qwen3"]
"""The HF ``model_type`` a model is built as and exported to (``GPTConfig.family``)."""
FAMILIES: tuple[str, ...] = get_args(Family)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rotary frequency scaling (HF ``rope_type: llama3``, Llama 3.1 and later): long
    wavelengths divided by ``factor``, short ones kept, those between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: Literal["llama3"] = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":  # HF configs construct this class too
            raise ValueError(f"rope_scaling: rope_type {self.rope_type!r} is not 'llama3'")
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError(
                "rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got "
                f"{self.factor}, {self.low_freq_factor}, {self.high_freq_factor}"
            )


# Fields that only the Llama family uses, with the value that means GPT-2.
_GPT2_VALUES = {
    "n_kv_head": None,
    "head_size": None,
    "qkv_bias": True,
    "out_bias": True,
    "mlp_bias": True,
    "qk_norm": False,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}
# What each HF class of the Llama family hard-codes (the rest is in its config.json): Llama and
# Qwen3 bias q, k, v and the output projection together (``attention_bias``).
_FAMILY_FIXED = {
    "llama": {"qk_norm": False},
    "mistral": {"qkv_bias": False, "out_bias": False, "mlp_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "out_bias": False, "mlp_bias": False, "qk_norm": False},
    "qwen3": {"mlp_bias": False, "qk_norm": True},
}


@dataclass
class GPTConfig:
    """Shape and regularisation of a model (names follow HF's ``GPT2Config``; the Llama family's
    HF names are given beside the fields that differ).

    ``n_head`` fixes the head width ``head_dim = n_embd / n_head`` (unless ``head_size`` sets it);
    a pruned model keeps fewer heads in some blocks (``n_head_per_layer``) and narrower FFNs
    (``n_inner_per_layer``). Every default means GPT-2, so a GPT-2 config sets none of the fields
    after ``n_inner_per_layer``.
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
    """Heads of each block, each in 0..n_head (a pruned model; the Llama family keeps whole
    key/value groups, so each is a multiple of n_head / n_kv_head); null = n_head in every block."""
    n_inner_per_layer: list[int] | None = None
    """FFN width of each block, each >= 0 (a pruned model); null = n_inner in every block."""
    family: Family = "gpt2"
    """``gpt2``: LayerNorm, learned positions (``n_positions`` of them), tanh-GELU FFN. ``llama``,
    ``mistral``, ``qwen2``, ``qwen3`` (the Llama family): RMSNorm, rotary positions (``n_positions``
    is HF's ``max_position_embeddings``), SwiGLU FFN of width ``n_inner`` (HF's
    ``intermediate_size``), and the fields below; ``layer_norm_epsilon`` is HF's ``rms_norm_eps``.
    Also the HF class the model exports as."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention; HF's ``num_key_value_heads``), dividing n_head;
    null = n_head. Llama family only."""
    head_size: int | None = None
    """Width of one head (HF's ``head_dim``) where it is not n_embd / n_head (e.g. Qwen3);
    null = n_embd / n_head. Llama family only."""
    qkv_bias: bool = True
    """Bias on the q, k, v projections (GPT-2, Qwen2; Llama and Qwen3: ``attention_bias``)."""
    out_bias: bool = True
    """Bias on the attention output projection (GPT-2; Llama and Qwen3: ``attention_bias``)."""
    mlp_bias: bool = True
    """Bias on the FFN projections (GPT-2; Llama: ``mlp_bias``)."""
    qk_norm: bool = False
    """RMSNorm over each head's q and k before the rotation (Qwen3, and only Qwen3)."""
    tie_word_embeddings: bool = True
    """The LM head is the token embedding (GPT-2 always); false: a separate [vocab, n_embd] head."""
    rope_theta: float = 10000.0
    """Base period of the rotary embedding. Llama family only."""
    rope_scaling: RopeScaling | None = None
    """Llama 3's frequency scaling (``rope_type: llama3``); null = plain RoPE. Llama family only."""

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
        if self.head_size is None and self.n_embd % self.n_head:
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
        self._check_family()

    def _check_family(self) -> None:
        """Refuse, naming the field, a setting the family's HF class cannot hold (so every model
        exports exactly), and a block that splits a key/value group."""
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "gpt2":
            for name, gpt2 in _GPT2_VALUES.items():
                if getattr(self, name) != gpt2:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is a Llama-family setting; family gpt2 "
                        f"takes {gpt2!r} (set family: llama, mistral, qwen2 or qwen3)"
                    )
            return
        for name, value in _FAMILY_FIXED[self.family].items():
            if getattr(self, name) != value:
                raise ValueError(f"family {self.family} has {name}={value} (its HF class fixes it)")
        if self.family in ("llama", "qwen3") and self.qkv_bias != self.out_bias:
            raise ValueError(
                f"family {self.family} biases q, k, v and the output projection together "
                f"(attention_bias): qkv_bias={self.qkv_bias} but out_bias={self.out_bias}"
            )
        for name in ("n_kv_head", "head_size"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        _check_whole_groups("n_head_per_layer", self.layer_heads, self.kv_groups)
        if self.head_dim % 2:
            raise ValueError(f"the rotary embedding needs an even head width, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        """Key/value heads of a full block (n_head unless grouped-query attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def kv_groups(self) -> int:
        """Query heads sharing each key/value head (1: GPT-2, and no grouped-query attention)."""
        return self.n_head // self.kv_heads

    @property
    def llama_like(self) -> bool:
        """RMSNorm, RoPE and SwiGLU (the Llama family) rather than GPT-2's blocks."""
        return self.family != "gpt2"

    @property
    def layer_heads(self) -> tuple[int, ...]:
        """Heads of each block."""
        return tuple(self.n_head_per_layer or [self.n_head] * self.n_layer)

    @property
    def layer_inner(self) -> tuple[int, ...]:
        """FFN width of each block."""
        width = 4 * self.n_embd if self.n_inner is None else self.n_inner
        return tuple(self.n_inner_per_layer or [width] * self.n_layer)


Unit = Literal["q", "kv", "neuron"]
"""What one pruning unit holds in a part of a shaped tensor: the query heads of one key/value
group (``kv_groups * head_dim`` features), one key/value head (``head_dim``), one FFN neuron (1)."""


class Shaped(NamedTuple):
    """A per-block tensor whose width follows the block's attention units (key/value groups with
    their query heads; one head each in GPT-2) or FFN neurons: along ``dim`` it is the consecutive
    ``parts``, each holding every unit's features in unit order."""

    dim: int
    kind: Literal["groups", "neurons"]
    parts: tuple[Unit, ...]


# Name suffix -> its shape. SwiGLU's gate, up and down projections share the neurons.
SHAPED_TENSORS = {
    "attn.qkv_proj.weight": Shaped(0, "groups", ("q", "kv", "kv")),
    "attn.qkv_proj.bias": Shaped(0, "groups", ("q", "kv", "kv")),
    "attn.out_proj.weight": Shaped(1, "groups", ("q",)),
    "mlp.gate_proj.weight": Shaped(0, "neurons", ("neuron",)),
    "mlp.gate_proj.bias": Shaped(0, "neurons", ("neuron",)),
    "mlp.up_proj.weight": Shaped(0, "neurons", ("neuron",)),
    "mlp.up_proj.bias": Shaped(0, "neurons", ("neuron",)),
    "mlp.down_proj.weight": Shaped(1, "neurons", ("neuron",)),
}


def split_units(t: Tensor, shaped: Shaped, config: GPTConfig) -> list[Tensor]:
    """The parts of a shaped tensor ``t``, each with ``shaped.dim`` unflattened into
    (units, the unit's features there): e.g. qkv_proj.weight [(g + 2) u d, C] ->
    [u, g d, C], [u, d, C], [u, d, C] for u groups of g query heads each ``d`` wide."""
    width = {"q": config.kv_groups * config.head_dim, "kv": config.head_dim, "neuron": 1}
    widths = [width[part] for part in shaped.parts]
    units = t.shape[shaped.dim] // sum(widths)
    pieces = t.split([units * w for w in widths], dim=shaped.dim)
    return [p.unflatten(shaped.dim, (units, w)) for p, w in zip(pieces, widths, strict=True)]


def join_units(parts: Sequence[Tensor], dim: int) -> Tensor:
    """The inverse of ``split_units``: the parts flattened back and concatenated along ``dim``."""
    return torch.cat([p.flatten(dim, dim + 1) for p in parts], dim=dim)


def _check_whole_groups(name: str, heads: Sequence[int], kv_groups: int) -> None:
    """Raise ValueError naming ``name[i]`` where block i's head count is not whole key/value
    groups of ``kv_groups`` query heads: a pruned block keeps or drops whole groups."""
    for i, h in enumerate(heads):
        if h % kv_groups:
            raise ValueError(
                f"{name}[{i}] = {h} is not a whole number of key/value groups ({kv_groups} query "
                'heads each): a pruned block keeps or drops whole groups (docs/design.md, "Pruning")'
            )


@dataclass(frozen=True)
class Subnet:
    """A prefix sub-network: block l keeps its first ``heads[l]`` heads and ``inner[l]`` neurons
    (heads in whole key/value groups: a multiple of ``GPTConfig.kv_groups``).

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
        _check_whole_groups("subnet heads", self.heads, config.kv_groups)

    def apply_to(self, config: GPTConfig) -> GPTConfig:
        """The config of the dense model holding just this sub-network."""
        return replace(
            config, n_head_per_layer=list(self.heads), n_inner_per_layer=list(self.inner)
        )


@dataclass
class GPTOutput:
    """What a forward pass returns.

    hidden_states: block index (0-based) -> residual stream after that block, [B, T, n_embd].
    embeddings: token (+ learned position) embeddings after dropout (block 0's input),
        [B, T, n_embd].
    last_hidden: final norm's output, [B, T, n_embd] (the LM head's input).
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
    """``nn.Linear`` that can run on a prefix of its features: of its inputs (``dim=1``), or of its
    outputs (``dim=0``) in each of the consecutive ``parts`` at once, ``parts`` giving their
    relative widths (qkv's [q; k; v] is (g, 1, 1): g query heads per key/value head).

    The slicing happens in this module's own forward, so an engine that gathers a module's weights
    around its forward (ZeRO-3) sees them whole. A zero-width layer (fully pruned) is allowed.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        dim: int = 0,
        parts: tuple[int, ...] = (1,),
        bias: bool = True,
    ) -> None:
        with warnings.catch_warnings():  # a zero-width weight's initialisation is a no-op
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            super().__init__(d_in, d_out, bias=bias)
        self.dim = dim
        self.parts = parts

    def forward(self, x: Tensor, keep: int | None = None) -> Tensor:
        """x [..., d_in] -> [..., d_out]; with ``keep``, only the first ``keep`` features of the
        sliced side take part: of the inputs ([..., keep] in), or of the first output part and
        as many in proportion of the others ([..., keep * sum(parts) / parts[0]] out)."""
        unit = self.out_features // sum(self.parts)
        full = self.in_features if self.dim == 1 else unit * self.parts[0]
        if keep is None or keep == full:
            return super().forward(x)
        if self.dim == 1:
            return F.linear(x, self.weight[:, :keep], self.bias)
        sizes = [unit * p for p in self.parts]
        kept = [keep * p // self.parts[0] for p in self.parts]
        bias = None if self.bias is None else _prefix_rows(self.bias, sizes, kept)
        return F.linear(x, _prefix_rows(self.weight, sizes, kept), bias)


def _prefix_rows(t: Tensor, sizes: list[int], kept: list[int]) -> Tensor:
    """The first ``kept[i]`` rows of each consecutive part of ``t`` (``sizes[i]`` rows each); a
    view when there is one part."""
    if len(sizes) == 1:
        return t[: kept[0]]
    return torch.cat([part[:k] for part, k in zip(t.split(sizes), kept, strict=True)])


def _project(proj: PrefixLinear, x: Tensor, keep: int | None) -> Tensor:
    """``proj(x)``, on a prefix of ``keep`` features when given. The whole-model path calls the
    module with ``x`` alone, as an engine that replaces projections by name expects."""
    return proj(x) if keep is None else proj(x, keep)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in fp32 whatever the input's dtype (as HF's
    ``LlamaRMSNorm``: a bf16 mean of squares loses too much), returned in the input's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> [..., dim]."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _norm(config: GPTConfig, dim: int) -> nn.Module:
    """The family's normalisation over ``dim`` features."""
    if config.llama_like:
        return RMSNorm(dim, config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon)


def rotary_cos_sin(config: GPTConfig, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles of positions 0..T-1, each [T, head_dim] (fp32), as HF's
    Llama computes them: frequency i is rope_theta^(-2i / head_dim), Llama 3 scaled, and both
    halves of a head use the same frequencies (HF's rotate-half layout, not interleaved pairs).

    Computed afresh for each call (a few thousand multiplies): no buffer to keep in fp32 when a
    teacher is cast to bf16, to move between devices or to materialise from the meta device."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)
    if (s := config.rope_scaling) is not None:
        # Llama 3: wavelengths beyond original / low_freq_factor are stretched by ``factor``,
        # those under original / high_freq_factor kept, and those between interpolated.
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(between, smoothed, scaled)
    angles = torch.arange(T, device=device).float()[:, None] * inv_freq  # [T, d / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, h, T, head_dim] by the angles whose cos and sin [T, head_dim] are given; the
    result keeps x's dtype (the kernels want q, k, v of one dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``n_head`` query heads of width ``head_dim`` (``n_head`` may be 0),
    each group of ``kv_groups`` consecutive query heads sharing one key/value head (1: GPT-2)."""

    def __init__(self, config: GPTConfig, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = config.head_dim
        # Under tensor parallelism with more ranks than key/value heads, each rank holds one
        # key/value head for its query heads and ``parallelize_gpt`` lowers this to their count.
        self.kv_groups = config.kv_groups
        width = n_head * config.head_dim
        kv_width = width // self.kv_groups
        self.qkv_proj = PrefixLinear(
            config.n_embd, width + 2 * kv_width, parts=(self.kv_groups, 1, 1), bias=config.qkv_bias
        )
        self.out_proj = PrefixLinear(width, config.n_embd, dim=1, bias=config.out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.layer_norm_epsilon) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.layer_norm_epsilon) if config.qk_norm else None
        # The config whose rotary settings rotate q and k; None for GPT-2, which adds learned
        # positions to the embeddings instead.
        self.rotary: GPTConfig | None = config if config.llama_like else None
        self.attn_dropout = config.dropout
        # Where the attention-probability dropout draws its masks: the default stream, or a
        # per-rank one when tensor parallelism shards the heads (set by ``parallelize_gpt``).
        self.dropout_rng: Callable[[], AbstractContextManager[None]] = nullcontext
        self.resid_dropout = nn.Dropout(config.dropout)
        self.implementation = "auto"

    def query_heads(self, qkv_width: int) -> int:
        """Query heads of a ``qkv_proj`` output ``qkv_width`` wide: (h + 2 h / kv_groups) heads."""
        return qkv_width * self.kv_groups // ((self.kv_groups + 2) * self.head_dim)

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A ``qkv_proj`` output [B, T, (h + 2 h / kv_groups) * head_dim] -> q [B, h, T, head_dim]
        and k, v [B, h / kv_groups, T, head_dim] as the attention compares them: q and k after
        the q/k norm (Qwen3) and the rotation (the Llama family), key/value heads not repeated."""
        B, T, _ = qkv.shape
        h = self.query_heads(qkv.shape[-1])
        kv_width = h // self.kv_groups * self.head_dim
        q, k, v = qkv.split([h * self.head_dim, kv_width, kv_width], dim=2)
        # [B, T, heads * head_dim] -> [B, T, heads, head_dim]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [B, heads, T, head_dim]
        if self.rotary is not None:
            cos, sin = rotary_cos_sin(self.rotary, T, qkv.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        n_active: int | None = None,
        head_mask: Tensor | None = None,
        *,
        return_log_probs: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, T, C] -> [B, T, C], using the first ``n_active`` heads (default all; whole
        key/value groups); ``head_mask`` [n_head] scales each head's output (its first
        ``n_active`` entries used).
        With ``return_log_probs`` also the attention log-probabilities [B, h, T, T], computed by
        the explicit softmax path."""
        B, T, _ = x.shape
        keep = None if n_active in (None, self.n_head) else n_active * self.head_dim
        qkv = _project(self.qkv_proj, x, keep)
        # The heads present, read off the output: a projection sharded by heads into
        # [q_r; k_r; v_r] per rank (tensor parallelism) gives this rank's heads.
        h, g = self.query_heads(qkv.shape[-1]), self.kv_groups
        if h == 0:
            # No heads (here): the sublayer adds only its output bias. y is cut from qkv, not
            # made anew, so that the backward still runs through qkv_proj: a tensor-parallel
            # rank holding none of a sub-network's heads joins its peers' collectives there.
            y, log_probs = qkv[..., :0], x.new_zeros(B, 0, T, T)
        else:
            q, k, v = self.split_heads(qkv)
            if g > 1:  # grouped-query attention: each key/value head serves g query heads
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
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
    """The FFN with ``n_inner`` neurons (``n_inner`` may be 0: it then adds only its output bias):
    tanh-GELU (GPT-2) or SwiGLU, ``silu(gate(x)) * up(x)`` (the Llama family)."""

    def __init__(self, config: GPTConfig, n_inner: int) -> None:
        super().__init__()
        self.n_inner = n_inner
        bias = config.mlp_bias
        self.gate_proj = (
            PrefixLinear(config.n_embd, n_inner, bias=bias) if config.llama_like else None
        )
        self.up_proj = PrefixLinear(config.n_embd, n_inner, bias=bias)
        self.down_proj = PrefixLinear(n_inner, config.n_embd, dim=1, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, n_active: int | None = None, neuron_mask: Tensor | None = None
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C], using the first ``n_active`` neurons (default all);
        ``neuron_mask`` [n_inner] scales each neuron's activation (first ``n_active`` used)."""
        keep = None if n_active == self.n_inner else n_active
        if self.gate_proj is None:
            a = F.gelu(_project(self.up_proj, x, keep), approximate="tanh")
        else:
            a = F.silu(_project(self.gate_proj, x, keep)) * _project(self.up_proj, x, keep)
        if neuron_mask is not None:
            a = a * neuron_mask[: a.shape[-1]].to(a.dtype)
        return self.dropout(_project(self.down_proj, a, keep))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = _norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, config.layer_heads[layer])
        self.ln_2 = _norm(config, config.n_embd)
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
    """The language model: GPT-2 or a Llama-family model, as ``config.family`` says.

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
        # Learned positions (GPT-2); the Llama family rotates q and k instead.
        self.wpe = None if config.llama_like else nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = _norm(config, config.n_embd)
        # The LM head when it is not the token embedding: [vocab_size, n_embd].
        self.unembed = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        )
        self.activation_checkpointing = activation_checkpointing
        self.tensor_parallel: TensorParallelLayout | None = None
        """How the model is sharded (set by ``parallelize_gpt``); None when it is whole."""
        self.vocab_in_use: int | None = None
        """The token ids the run's tokenizer can produce, when fewer than the embedding's rows
        (Qwen pads its embedding past the tokenizer): the rows beyond are kept out of every loss
        and score (``loss_head``). None: every row is a token."""
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
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head: [vocab_size, n_embd], the token embedding's unless untied."""
        return self.wte.weight if self.unembed is None else self.unembed.weight

    @property
    def vocab_shard(self) -> VocabShard | None:
        """This rank's vocabulary rows of the LM head under tensor parallelism, else None."""
        return None if self.tensor_parallel is None else self.tensor_parallel.vocab

    def loss_head(self) -> tuple[Tensor, VocabShard | None]:
        """The LM head [V(_r), d] the losses and scores use, with its vocabulary shard: the head
        itself (this rank's rows under tensor parallelism), or the whole head a teacher split
        apart from its student keeps (``TensorParallelLayout.whole_head``), unsharded; only the
        first ``vocab_in_use`` rows of an unsharded head."""
        layout = self.tensor_parallel
        if layout is not None and layout.whole_head is None:
            return self.lm_head_weight, self.vocab_shard  # padding rows: the shard's padding
        head = self.lm_head_weight if layout is None else layout.whole_head
        # The parameter itself when every row is a token: a slice of a ZeRO-3 partition would
        # lose the parameter's partitioned shape.
        return (head if self.vocab_in_use is None else head[: self.vocab_in_use]), None

    def set_attention(self, implementation: str) -> None:
        for block in self.blocks:
            block.attn.implementation = implementation

    def lm_head(self, normed_hidden: Tensor) -> Tensor:
        """[..., n_embd] -> logits [..., vocab_size]."""
        return F.linear(normed_hidden, self.lm_head_weight)

    def head(self, hidden: Tensor) -> Tensor:
        """The full task head applied to a residual-stream state: final norm, then LM head."""
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
            (which must then be None); positions are added (or rotated in) as usual.
        output_layers: 0-based block indices whose residual-stream outputs are returned.
        attention_layer: a block whose attention log-probabilities are returned (that block runs
            the explicit softmax path; the others keep the configured kernel).
        return_logits: compute logits [B, T, V]; pass False when the loss fuses the LM head.
        stop_after: skip every block after this index (and the final norm and head).
        subnet: run only this prefix sub-network of the shared weights (docs/design.md,
            "Sub-networks on shared weights, and masks").
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
        if self.wpe is None:
            x = self.drop(tokens)
        else:
            x = self.drop(tokens + self.wpe(torch.arange(T, device=tokens.device)))
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
        if exclude_embeddings and self.wpe is not None:
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
