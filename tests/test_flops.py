"""The FLOP count against a hand count and against torch's own count of a forward pass, in the
convention ted_scale/flops.py names (PaLM/Megatron: a matmul [m, k] x [k, n] is 2mkn; attention's
whole T x T score matrix counts)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ted_scale.flops import forward_flops, head_flops
from ted_scale.model import GPT, GPTConfig


def test_forward_flops_of_a_tiny_model_equal_a_hand_count(tiny_gpt, tiny_config):
    d, T, V, L = tiny_config.n_embd, 16, tiny_config.vocab_size, tiny_config.n_layer
    projections = 2 * d * 3 * d + 2 * d * d + 2 * d * 4 * d + 2 * 4 * d * d  # = 24 d^2
    # Per token: its query against all T keys (2 T d) and all T values weighted (2 T d).
    attention = 2 * T * d + 2 * T * d
    assert forward_flops(tiny_gpt.blocks, T) == L * (projections + attention)
    assert forward_flops(tiny_gpt.blocks[0].attn, T) == 2 * d * 3 * d + 2 * d * d + 4 * T * d
    assert head_flops(tiny_gpt) == 2 * V * d


@pytest.mark.parametrize(
    "family",
    [
        # GQA 4:2, SwiGLU, untied head.
        dict(family="llama", n_kv_head=2, qkv_bias=False, out_bias=False, mlp_bias=False,
             tie_word_embeddings=False),
        # One key/value head, heads 32 wide at width 64, q/k norm, tied head.
        dict(family="qwen3", n_kv_head=1, head_size=32, qkv_bias=False, out_bias=False,
             mlp_bias=False, qk_norm=True),
    ],
    ids=["llama", "qwen3"],
)  # fmt: skip
def test_the_llama_familys_flops_equal_what_torch_counts_in_its_forward(family, one_thread):
    """torch's FlopCounterMode counts every matmul a forward pass runs (2mkn each): SwiGLU's three
    matrices, grouped-query attention's narrower k and v, the untied head; the eager kernel's
    scores and weighted values are matmuls over the whole T x T matrix, as flops.py counts."""
    config = GPTConfig(
        vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96, **family
    )
    model = GPT(config, attention="eager").eval()
    B, T = 2, 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 101, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    assert forward_flops(model.blocks, T) + head_flops(model) == counted
    q, kv = 4 * config.head_dim, config.kv_heads * config.head_dim
    by_hand = 2 * 64 * (q + 2 * kv) + 2 * q * 64 + 3 * 2 * 64 * 96 + 4 * T * q
    assert forward_flops(model.blocks[0], T) == by_hand
