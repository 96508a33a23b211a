import pytest
import torch
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
