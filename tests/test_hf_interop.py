import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from ted_scale.data.tokenizer import train_bpe_tokenizer
from ted_scale.model import GPT, GPTConfig, export_hf, load_pretrained
from ted_scale.model.hf import CheckpointMismatchError, config_to_hf


def test_export_then_import_reproduces_weights_exactly(tiny_gpt, tmp_path):
    export_hf(tiny_gpt, tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    state = tiny_gpt.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_exported_folder_loads_with_auto_model_and_gives_the_same_logits(tiny_gpt, tmp_path):
    tokenizer = train_bpe_tokenizer(["hello world, a tiny corpus"] * 8, vocab_size=300)
    model = GPT(
        GPTConfig(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )
    model.eval()
    export_hf(model, tmp_path / "hf", tokenizer)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, len(tokenizer), (2, 32))
    with torch.no_grad():
        assert (auto(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert auto.config.eos_token_id == tokenizer.eos_token_id


def test_loading_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(
    tiny_config, tmp_path
):
    GPT2LMHeadModel(config_to_hf(tiny_config)).save_pretrained(tmp_path / "hf")
    wider = GPTConfig(vocab_size=101, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    with pytest.raises(CheckpointMismatchError, match=r"'wte.weight'.*\(101, 48\).*\(101, 64\)"):
        load_pretrained(tmp_path / "hf", config=wider)
