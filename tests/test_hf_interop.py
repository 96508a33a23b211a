import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from ted_scale.data.tokenizer import train_bpe_tokenizer
from ted_scale.io import DamagedFileError, read_safetensors
from ted_scale.model import GPT, GPTConfig, export_hf, from_hf_model, load_pretrained, to_hf_model
from ted_scale.model.hf import CheckpointMismatchError, ModelFolderError, config_to_hf


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


def pruned_gpt(tiny_config) -> GPT:
    """A model whose blocks differ: 4, 1, 0 and 3 heads, FFN widths 192, 7, 50 and 0."""
    torch.manual_seed(0)
    config = replace(tiny_config, n_head_per_layer=[4, 1, 0, 3], n_inner_per_layer=[192, 7, 50, 0])
    model = GPT(config).eval()
    with torch.no_grad():  # nonzero biases, so a zero-width sublayer still adds something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_a_non_uniform_model_round_trips_through_hf_and_loads_with_auto_model(
    tiny_config, tmp_path
):
    model = pruned_gpt(tiny_config)
    export_hf(model, tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf").eval()
    assert loaded.config.layer_heads == (4, 1, 0, 3)
    assert loaded.config.layer_inner == (192, 7, 50, 0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    # HF holds the padded shape: every block n_head heads and the widest FFN.
    assert auto.transformer.h[2].attn.c_attn.weight.shape == (48, 3 * 48)
    assert auto.transformer.h[3].mlp.c_fc.weight.shape == (48, 192)
    ids = torch.randint(0, 101, (2, 64))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(auto(ids).logits, expected, atol=1e-5, rtol=0)


def test_padding_that_is_not_zero_is_refused_on_import(tiny_config):
    hf = to_hf_model(pruned_gpt(tiny_config))
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[:, 100] = 1.0  # a padded neuron of block 1
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        from_hf_model(hf)


def test_a_malformed_per_layer_shape_in_config_json_names_the_folder_and_key(tiny_config, tmp_path):
    export_hf(pruned_gpt(tiny_config), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["n_head_per_layer"] = [4, 1, 0]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hf: config: n_head_per_layer has 3 entries"):
        load_pretrained(tmp_path / "hf")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), r"model.safetensors: missing \(the folder"),
        (lambda d: _truncate(d / "model.safetensors"), r"model.safetensors: truncated or not a"),
        (lambda d: (d / "config.json").unlink(), r"config.json: missing"),
    ],
    ids=["no-weights", "truncated-weights", "no-config"],
)
def test_a_damaged_model_folder_is_named_by_file(tiny_gpt, tmp_path, damage, message):
    export_hf(tiny_gpt, tmp_path / "hf")
    damage(tmp_path / "hf")
    with pytest.raises(ModelFolderError, match=message):
        load_pretrained(tmp_path / "hf")


def test_a_folder_of_another_architecture_is_refused_naming_it(tmp_path):
    """A Llama folder was loaded into GPT-2 with every weight newly initialised, and trained on;
    the Llama family now loads (test_model_families.py), any other architecture is refused."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    with pytest.raises(ModelFolderError, match=r"a 'gpt_neox' model \(GPTNeoXForCausalLM\)"):
        load_pretrained(tmp_path / "neox")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_gpt2_folder_whose_weights_do_not_all_load_is_refused_naming_the_keys(
    tiny_gpt, tmp_path, change
):
    from safetensors.torch import load_file, save_file

    export_hf(tiny_gpt, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    if change == "missing":
        del state["transformer.h.1.mlp.c_fc.weight"]
    else:
        state["transformer.h.1.mlp.extra"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"{change} keys: \[.*h\.1\.mlp\."):
        load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_model_folders_damaged_tokenizer_is_named_never_replaced(tiny_gpt, tmp_path, damage):
    from ted_scale.data import DataError
    from ted_scale.distill.run_models import folder_tokenizer

    tokenizer = train_bpe_tokenizer(["hello world, a tiny corpus"] * 8, vocab_size=300)
    export_hf(tiny_gpt, tmp_path / "hf", tokenizer)
    spec = tmp_path / "hf" / "tokenizer.json"
    spec.unlink() if damage == "missing" else _truncate(spec)
    with pytest.raises(DataError, match=rf"{spec}: {damage}"):
        folder_tokenizer(str(tmp_path / "hf"))


def test_a_qwen2_folder_loads_the_tokenizer_it_ships_as_shipped(tmp_path):
    """transformers picks Qwen2's tokenizer class for a qwen2 folder, which replaces the shipped
    normalizer and pre-tokenizer with Qwen's; an exported student ships the data's own BPE."""
    from ted_scale.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = train_bpe_tokenizer(["hello world, a tiny corpus"] * 8, vocab_size=300)
    qwen2 = GPTConfig(
        family="qwen2", vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1,
        n_head=2, out_bias=False, mlp_bias=False, tie_word_embeddings=False,
    )  # fmt: skip
    export_hf(GPT(qwen2), tmp_path / "hf", tokenizer)
    loaded = load_tokenizer(str(tmp_path / "hf"))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    text = "Hello  world,\r\na tiny corpus 123"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_truncated_filters_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from ted_scale.distill.filter_io import load_filters_into
    from ted_scale.distill.filters import FilterBank

    bank = FilterBank([torch.nn.Linear(8, 8)], [0])
    save_file(bank.state_dict(), tmp_path / "teacher.safetensors")
    _truncate(tmp_path / "teacher.safetensors")
    with pytest.raises(DamagedFileError, match=r"teacher.safetensors: truncated"):
        load_filters_into(bank, tmp_path, "teacher")


def test_a_pickle_renamed_safetensors_is_refused_by_name_never_unpickled(tmp_path):
    """What CR-ILD (ild_student.safetensors) and MiniDisc (importance.safetensors) read back."""
    path = tmp_path / "ild_student.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # a pickle under a safetensors name
    with pytest.raises(DamagedFileError, match=r"ild_student.safetensors: truncated or not a"):
        read_safetensors(path)


def test_a_weight_index_pointing_at_a_pickle_is_refused_naming_the_shard(tiny_gpt, tmp_path):
    export_hf(tiny_gpt, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(tiny_gpt.state_dict(), tmp_path / "hf" / "pytorch_model-00001.bin")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model-00001.bin"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"pytorch_model-00001.bin: truncated or not a"):
        load_pretrained(tmp_path / "hf")
