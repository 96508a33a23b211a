"""GPT-2 as one readable file: pre-LayerNorm blocks, learned positions, tanh-GELU, tied embeddings.

Projection names are chosen so tensor parallelism can shard them by name:
``attn.qkv_proj`` (column-parallel; its output rows are [q; k; v], each ``n_embd`` wide),
``attn.out_proj`` (row-parallel), ``mlp.up_proj`` (column-parallel), ``mlp.down_proj`` (row-parallel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ted_scale.model.attention import causal_attention, causal_attention_with_log_probs


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model (names follow HF's ``GPT2Config``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass
class GPTOutput:
    """What a forward pass returns.

    hidden_states: block index (0-based) -> residual stream after that block, [B, T, n_embd].
    last_hidden: final LayerNorm output, [B, T, n_embd] (the LM head's input).
    logits: [B, T, vocab_size], or None when the caller fuses the LM head into its loss.
    attention_log_probs: the ``attention_layer`` block's attention log-probabilities
        [B, n_head, T, T] (-inf above the diagonal), or None.
    """

    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    last_hidden: Tensor | None = None
    logits: Tensor | None = None
    attention_log_probs: Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.implementation = "auto"

    def forward(self, x: Tensor, return_log_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [B, T, C] -> (output [B, T, C], attention log-probabilities [B, n_head, T, T] when
        ``return_log_probs``, computed by the explicit softmax path, else None)."""
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.attn_dropout if self.training else 0.0
        log_probs = None
        if return_log_probs:
            y, log_probs = causal_attention_with_log_probs(q, k, v, dropout_p=dropout_p)
        else:
            y = causal_attention(q, k, v, dropout_p=dropout_p, implementation=self.implementation)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y)), log_probs


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.down_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_attention(x, False)[0]

    def forward_with_attention(
        self, x: Tensor, with_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, T, C] -> (x [B, T, C], attention log-probabilities when ``with_attention``)."""
        attended, log_probs = self.attn(self.ln_1(x), with_attention)
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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.activation_checkpointing = activation_checkpointing
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
    ) -> GPTOutput:
        """Run the model on ``input_ids`` [B, T], or on given token embeddings.

        inputs_embeds: [B, T, n_embd] used in place of the token embeddings of ``input_ids``
            (which must then be None); position embeddings are added as usual.
        output_layers: 0-based block indices whose residual-stream outputs are returned.
        attention_layer: a block whose attention log-probabilities are returned (that block runs
            the explicit softmax path; the others keep the configured kernel).
        return_logits: compute logits [B, T, V]; pass False when the loss fuses the LM head.
        stop_after: skip every block after this index (and the final LayerNorm and head).
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
        positions = torch.arange(T, device=tokens.device)
        x = self.drop(tokens + self.wpe(positions))
        out = GPTOutput()
        for i, block in enumerate(self.blocks):
            with_attention = i == attention_layer
            run = block.forward_with_attention
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, log_probs = checkpoint(run, x, with_attention, use_reentrant=False)
            else:
                x, log_probs = run(x, with_attention)
            if with_attention:
                out.attention_log_probs = log_probs
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
