"""The Llama family (Llama, Mistral, Qwen2, Qwen3) in the one decoder: HF checkpoints load with
HF's logits and export back to the same HF class; what is not implemented is refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ted_scale.model import GPT, GPTConfig, Subnet, export_hf, load_pretrained, student_from_teacher
from ted_scale.model.hf import ModelFolderError, pretrained_shape

pytestmark = pytest.mark.usefixtures("one_thread")

# Vocabulary 97 (odd), width 64, 4 query heads; the cases vary the rest.
COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=32,
)  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip
CASES = {
    "llama-gqa-untied-llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3),
    ),
    "llama-mqa-tied-biases": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, num_hidden_layers=3),
    ),
    "mistral-mqa-untied-window": (
        MistralConfig,
        MistralForCausalLM,
        dict(num_key_value_heads=1, sliding_window=32, tie_word_embeddings=False),
    ),
    "qwen2-gqa-tied-qkv_bias": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6}),
    ),
    "qwen3-mqa-untied-qk_norm-head_dim": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
    ),
}


def hf_model(case: str, **changes) -> PreTrainedModel:
    """A random HF model of ``case``, its norms and biases moved off their 1 and 0 inits."""
    config_class, model_class, own = CASES[case]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **own, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_an_hf_checkpoint_loads_with_its_logits_and_exports_to_the_same_class(case, tmp_path):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf").eval()
    assert model.config.family == hf.config.model_type
    assert pretrained_shape(str(tmp_path / "hf")) == model.config
    with torch.no_grad():
        expected = hf(ids()).logits
        torch.testing.assert_close(model(ids()).logits, expected, atol=1e-5, rtol=0)

    export_hf(model, tmp_path / "out")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(auto) is type(hf)
    theirs = auto.state_dict()
    for name, tensor in hf.state_dict().items():  # every tensor back where HF keeps it
        assert torch.equal(theirs[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(auto(ids()).logits, expected, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_is_applied_not_ignored(tmp_path):
    hf_model("llama-gqa-untied-llama3").save_pretrained(tmp_path / "hf")
    scaled = load_pretrained(tmp_path / "hf").eval()
    assert scaled.config.rope_scaling.factor == 8.0
    plain = GPT(replace(scaled.config, rope_scaling=None)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        assert (plain(ids()).logits - scaled(ids()).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("case", "changes", "message"),
    [
        (
            "llama-gqa-untied-llama3",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            r"rope_type 'yarn' is not supported",
        ),
        (
            "mistral-mqa-untied-window",
            {"sliding_window": 16},
            r"sliding_window=16 is shorter than max_position_embeddings=32",
        ),
        ("qwen2-gqa-tied-qkv_bias", {"hidden_act": "gelu"}, r"hidden_act 'gelu' is not SiLU"),
    ],
    ids=["rope-yarn", "mistral-window", "gelu"],
)
def test_an_hf_setting_not_implemented_is_refused_by_name(case, changes, message, tmp_path):
    hf_model(case, **changes).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_llama_folder_whose_weights_do_not_all_load_is_refused_naming_the_keys(tmp_path, change):
    from safetensors.torch import load_file, save_file

    hf_model("llama-gqa-untied-llama3").save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    if change == "missing":
        del state["model.layers.1.mlp.gate_proj.weight"]
    else:
        state["model.layers.1.mlp.extra"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"LlamaForCausalLM \({change} keys: \[.*1\.mlp\."):
        load_pretrained(tmp_path / "hf")


def llama_config(**changes) -> GPTConfig:
    base = dict(
        family="llama", vocab_size=97, n_positions=32, n_embd=64, n_layer=3, n_head=4,
        n_kv_head=2, n_inner=96, dropout=0.0, qkv_bias=False, out_bias=False, mlp_bias=False,
    )  # fmt: skip
    return GPTConfig(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"family": "gpt2"}, r"n_kv_head=2 is a Llama-family setting; family gpt2 takes None"),
        (
            {
                "family": "gpt2",
                "n_kv_head": None,
                "qkv_bias": True,
                "out_bias": True,
                "mlp_bias": True,
                "tie_word_embeddings": False,
            },
            r"tie_word_embeddings=False is a Llama-family setting",
        ),
        ({"family": "mistral", "mlp_bias": True}, r"family mistral has mlp_bias=False"),
        ({"family": "qwen2"}, r"family qwen2 has qkv_bias=True"),
        ({"family": "qwen3", "qk_norm": False}, r"family qwen3 has qk_norm=True"),
        ({"qkv_bias": True}, r"attention_bias\): qkv_bias=True but out_bias=False"),
        ({"n_kv_head": 3}, r"n_kv_head \(3\) must divide n_head \(4\)"),
        (
            {"n_head_per_layer": [4, 3, 4]},
            r"n_head_per_layer\[1\] = 3 is not a whole number of key/value groups \(2 query heads",
        ),
        ({"head_size": 15}, r"even head width, got 15"),
    ],
)
def test_a_config_its_hf_class_cannot_hold_is_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        llama_config(**changes)


def test_gqa_attention_kernels_agree_and_hand_over_the_attention_distribution():
    torch.manual_seed(0)
    model = GPT(llama_config(qk_norm=False, tie_word_embeddings=False)).eval()
    x = ids()
    with torch.no_grad():
        model.set_attention("sdpa")
        sdpa = model(x, output_layers=[0, 2])
        model.set_attention("eager")
        eager = model(x, attention_layer=1)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=0)
    assert eager.attention_log_probs.shape == (2, 4, 32, 32)  # one distribution per query head
    torch.testing.assert_close(eager.attention_log_probs.exp().sum(-1), torch.ones(2, 4, 32))
    assert model.wpe is None and model.lm_head_weight is model.unembed.weight
    torch.testing.assert_close(sdpa.last_hidden, model.ln_f(sdpa.hidden_states[2]))
    with pytest.raises(ValueError, match=r"subnet heads\[1\] = 3 is not a whole number of key/"):
        model(x, subnet=Subnet(heads=(4, 3, 4), inner=(96, 96, 96)))


def test_a_student_copies_the_familys_parts_from_the_teacher():
    torch.manual_seed(0)
    teacher = GPT(llama_config(family="qwen3", qkv_bias=True, out_bias=True, qk_norm=True,
                               tie_word_embeddings=False))  # fmt: skip
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    student = student_from_teacher(teacher, [0, 2])
    assert replace(student.config, n_layer=3) == teacher.config
    theirs = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        source = name.replace("blocks.1.", "blocks.2.")
        assert torch.equal(tensor, theirs[source]), name
    assert {"unembed.weight", "blocks.1.mlp.gate_proj.weight", "blocks.1.attn.q_norm.weight"} <= (
        student.state_dict().keys()
    )


@pytest.mark.parametrize(
    ("case", "heads"),
    [
        ("llama-gqa-untied-llama3", (2, 0)),  # one of two key/value groups, then none
        ("qwen2-gqa-tied-qkv_bias", (0, 2)),
        ("qwen3-mqa-untied-qk_norm-head_dim", (4, 0)),  # one group of all four query heads
    ],
    ids=["llama-gqa", "qwen2-bias", "qwen3-mqa-norm"],
)
def test_a_pruned_family_model_exports_zero_padded_and_imports_trimmed(case, heads, tmp_path):
    """Per-block shapes exported as HF's uniform shape, padded with zero heads (whole key/value
    groups, biases and all) and zero neurons: HF's class computes the pruned model's logits, and
    the import trims the padding back to the same tensors."""
    from ted_scale.model.pruning import extract

    hf_model(case).save_pretrained(tmp_path / "hf")
    pruned = extract(load_pretrained(tmp_path / "hf"), Subnet(heads, (40, 7))).eval()
    export_hf(pruned, tmp_path / "pruned")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(auto).__name__ == CASES[case][1].__name__
    assert auto.model.layers[1].self_attn.q_proj.weight.shape[0] == 4 * pruned.config.head_dim
    assert auto.model.layers[0].mlp.gate_proj.weight.shape[0] == 40  # the widest block's
    loaded = load_pretrained(tmp_path / "pruned").eval()
    assert (loaded.config.layer_heads, loaded.config.layer_inner) == (heads, (40, 7))
    theirs = loaded.state_dict()
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    with torch.no_grad():
        expected = pruned(ids()).logits
        torch.testing.assert_close(auto(ids()).logits, expected, atol=1e-5, rtol=0)
