from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from ted_scale.model import GPT, from_hf_model
from ted_scale.model.hf import config_to_hf


@pytest.mark.parametrize("attention", ["eager", "sdpa", "auto"])
def test_logits_match_transformers_gpt2_for_every_cpu_attention(tiny_config, attention):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config_to_hf(tiny_config)).eval()
    model = from_hf_model(hf, attention=attention).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.n_positions))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_flash_attention_without_cuda_fails_with_a_clear_message(tiny_gpt):
    tiny_gpt.set_attention("flash")
    with pytest.raises(RuntimeError, match="flash-attn"):
        tiny_gpt(torch.zeros(1, 8, dtype=torch.long))


def test_requested_hidden_states_are_residual_stream_outputs(tiny_gpt):
    ids = torch.randint(0, 101, (2, 16))
    out = tiny_gpt(ids, output_layers=[0, 2, 3], return_logits=False)
    assert out.logits is None
    assert sorted(out.hidden_states) == [0, 2, 3]
    # Replay the blocks by hand: H^i is block i's output, before the final LayerNorm.
    x = tiny_gpt.wte(ids) + tiny_gpt.wpe(torch.arange(16))
    for i, block in enumerate(tiny_gpt.blocks):
        x = block(x)
        if i in out.hidden_states:
            torch.testing.assert_close(out.hidden_states[i], x)
    torch.testing.assert_close(out.last_hidden, tiny_gpt.ln_f(x))
    torch.testing.assert_close(tiny_gpt(ids).logits, tiny_gpt.head(x))


def test_stop_after_skips_later_blocks(tiny_gpt):
    ids = torch.randint(0, 101, (1, 8))
    out = tiny_gpt(ids, output_layers=[1], stop_after=1)
    assert out.last_hidden is None and out.logits is None
    torch.testing.assert_close(
        out.hidden_states[1], tiny_gpt(ids, output_layers=[1]).hidden_states[1]
    )


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    plain = GPT(tiny_config)
    ckpt = GPT(tiny_config, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 101, (2, 16))
    for model in (plain, ckpt):
        model.train()
        model(ids).logits.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_projection_names_allow_sharding_by_name(tiny_gpt):
    names = {n for n, _ in tiny_gpt.named_parameters()}
    for proj in ("attn.qkv_proj", "attn.out_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"blocks.0.{proj}.weight" in names


def test_sequence_longer_than_context_is_rejected(tiny_gpt):
    with pytest.raises(ValueError, match="n_positions"):
        tiny_gpt(torch.zeros(1, 65, dtype=torch.long))


def pruned_config(tiny_config, **changes):
    """tiny_config with blocks of different shapes, one without heads and one without neurons."""
    return replace(
        tiny_config, n_head_per_layer=[4, 1, 0, 3], n_inner_per_layer=[192, 7, 50, 0], **changes
    )


def test_each_block_has_its_own_head_count_and_ffn_width(tiny_config):
    model = GPT(pruned_config(tiny_config))
    C, hd = 48, 12
    for block, h, n in zip(model.blocks, [4, 1, 0, 3], [192, 7, 50, 0], strict=True):
        assert block.attn.qkv_proj.weight.shape == (3 * h * hd, C)
        assert block.attn.out_proj.weight.shape == (C, h * hd)
        assert block.mlp.up_proj.weight.shape == (n, C)
        assert block.mlp.down_proj.weight.shape == (C, n)
    assert model(torch.randint(0, 101, (2, 16))).logits.shape == (2, 16, 101)


def test_uniform_per_layer_lists_build_the_default_model(tiny_config):
    torch.manual_seed(0)
    plain = GPT(tiny_config).eval()
    torch.manual_seed(0)
    listed = GPT(replace(tiny_config, n_head_per_layer=[4] * 4, n_inner_per_layer=[192] * 4))
    for (name, a), b in zip(plain.state_dict().items(), listed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 101, (2, 16))
    assert torch.equal(plain(ids).logits, listed.eval()(ids).logits)


def test_attention_groups_qkv_rows_by_the_blocks_own_heads(tiny_config):
    torch.manual_seed(0)
    attn = GPT(pruned_config(tiny_config)).blocks[3].attn.eval()  # 3 heads of 12
    x = torch.randn(2, 16, 48)
    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
    q, k, v = (x @ w[i * 36 : (i + 1) * 36].T + b[i * 36 : (i + 1) * 36] for i in range(3))
    heads = []
    for j in range(3):  # head j is columns [12 j, 12 j + 12) of each of q, k, v
        cols = slice(12 * j, 12 * j + 12)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / 12**0.5
        scores = scores.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., cols])
    expected = torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_a_block_without_heads_or_neurons_adds_only_its_output_biases(tiny_config):
    torch.manual_seed(0)
    config = replace(tiny_config, n_head_per_layer=[4, 0, 4, 4], n_inner_per_layer=[0, 0, 9, 9])
    block = GPT(config).blocks[1]
    nn.init.normal_(block.attn.out_proj.bias)
    nn.init.normal_(block.mlp.down_proj.bias)
    x = torch.randn(2, 16, 48)
    expected = x + block.attn.out_proj.bias + block.mlp.down_proj.bias
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_head_per_layer": [4, 4]}, r"n_head_per_layer has 2 entries but n_layer is 4"),
        ({"n_head_per_layer": [4, 5, 4, 4]}, r"n_head_per_layer\[1\] = 5 exceeds n_head \(4\)"),
        ({"n_inner_per_layer": [8, -1, 8, 8]}, r"n_inner_per_layer\[1\] = -1 must be an integer"),
        ({"n_inner": -3}, r"n_inner \(-3\) must be >= 0"),
    ],
)
def test_bad_per_layer_shapes_are_rejected_naming_the_field(tiny_config, changes, message):
    with pytest.raises(ValueError, match=message):
        replace(tiny_config, **changes)
