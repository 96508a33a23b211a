"""The FLOP count against a hand count, in the convention ted_scale/flops.py names (PaLM/Megatron:
a matmul [m, k] x [k, n] is 2mkn; attention's whole T x T score matrix counts)."""

from ted_scale.flops import forward_flops, head_flops


def test_forward_flops_of_a_tiny_model_equal_a_hand_count(tiny_gpt, tiny_config):
    d, T, V, L = tiny_config.n_embd, 16, tiny_config.vocab_size, tiny_config.n_layer
    projections = 2 * d * 3 * d + 2 * d * d + 2 * d * 4 * d + 2 * 4 * d * d  # = 24 d^2
    # Per token: its query against all T keys (2 T d) and all T values weighted (2 T d).
    attention = 2 * T * d + 2 * T * d
    assert forward_flops(tiny_gpt.blocks, T) == L * (projections + attention)
    assert forward_flops(tiny_gpt.blocks[0].attn, T) == 2 * d * 3 * d + 2 * d * d + 4 * T * d
    assert head_flops(tiny_gpt) == 2 * V * d
