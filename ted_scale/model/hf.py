"""Conversion between this GPT and Hugging Face's ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` (``GPTConfig.family`` is the
HF ``model_type``).

The Llama family's q, k and v projections are fused into ``attn.qkv_proj`` here (rows [q; k; v])
and split again on export; every other tensor is renamed only. Settings this model does not
implement (sliding-window attention that a sequence could reach, rope types other than the
default and ``llama3``, activations other than SiLU) are refused on import, naming the setting.

HF's GPT-2 stores its projections as ``Conv1D`` (weight [in, out]); ours are ``nn.Linear``
(weight [out, in]), so those weights are transposed on the way in and out.

A model of non-uniform shape (docs/design.md "Models of non-uniform shape") is exported zero-padded
to ``n_head`` heads (``n_kv_head`` key/value groups) and the widest FFN in every block: a padded
head has zero q, k, v and output weights and biases, so it attends uniformly to zero values, and a
padded neuron zero weights and biases (gelu(0) = silu(0) * 0 = 0): they add exactly nothing and HF
computes the same logits. transformers 5 has no head pruning (``pruned_heads`` is gone) and every
HF class here has one head count and one FFN width for all blocks, so padding is the exact form HF
loads. The true shape is kept in the config as ``n_head_per_layer`` / ``n_inner_per_layer`` (keys
HF keeps and ignores), and import trims the padding back, refusing if a padded entry is not zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ted_scale.io import atomic_replace_dir
from ted_scale.model.gpt import (
    GPT,
    SHAPED_TENSORS,
    GPTConfig,
    RopeScaling,
    Shaped,
    join_units,
    split_units,
)

# family (HF model_type) -> (HF config class, HF model class).
HF_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

# (our suffix, HF suffix, transposed) for the tensors of one block.
_BLOCK_TENSORS = (
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv_proj.weight", "attn.c_attn.weight", True),
    ("attn.qkv_proj.bias", "attn.c_attn.bias", False),
    ("attn.out_proj.weight", "attn.c_proj.weight", True),
    ("attn.out_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True),
    ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
)
_TOP_TENSORS = (
    ("wte.weight", "transformer.wte.weight"),
    ("wpe.weight", "transformer.wpe.weight"),
    ("ln_f.weight", "transformer.ln_f.weight"),
    ("ln_f.bias", "transformer.ln_f.bias"),
)


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor does not fit the model it is loaded into."""


class ModelFolderError(ValueError):
    """A local HF model folder lacks a file, holds a truncated or unreadable one, or holds a
    model of an architecture not in ``HF_CLASSES`` or whose weights do not all load."""


def check_model_folder(folder: Path) -> None:
    """A local model folder must hold a readable ``config.json`` and a complete
    ``model.safetensors`` (or a sharded index); the error names the file."""
    import json

    from safetensors import SafetensorError, safe_open

    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{config}: missing (an HF model folder needs it)") from None
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{config}: truncated or not JSON ({e})") from None
    weights = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not weights[0].is_file():
        if not index.is_file():
            found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise ModelFolderError(f"{weights[0]}: missing (the folder holds {found})")
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{index}: truncated or not a weight index ({e})") from None
        weights = [folder / shard for shard in shards]
    for path in weights:
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(f"{path}: truncated or not a safetensors file ({e})") from None


def config_from_hf(hf_config: PretrainedConfig, *, dropout: float | None = None) -> GPTConfig:
    """The ``GPTConfig`` of an HF config of a family in ``HF_CLASSES``; ``dropout`` overrides
    the checkpoint's (GPT-2's ``resid_pdrop``, the Llama family's ``attention_dropout``)."""
    if hf_config.model_type != "gpt2":
        return _llama_config_from_hf(hf_config, dropout=dropout)
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {hf_config.activation_function!r} is not tanh-GELU")
    if getattr(hf_config, "pruned_heads", None):
        raise ValueError(
            "pruned_heads is not supported (transformers 5 removed head pruning); "
            "ted_scale exports pruned models zero-padded with n_head_per_layer instead"
        )
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        dropout=hf_config.resid_pdrop if dropout is None else dropout,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
        n_inner=hf_config.n_inner,
        **_true_shape_from_hf(hf_config),
    )


def _true_shape_from_hf(hf_config: PretrainedConfig) -> dict[str, list[int] | None]:
    """The true per-block shape a padded export keeps in its config (absent: uniform)."""
    keys = ("n_head_per_layer", "n_inner_per_layer")
    return {key: getattr(hf_config, key, None) for key in keys}


def _llama_config_from_hf(hf: PretrainedConfig, *, dropout: float | None) -> GPTConfig:
    family = hf.model_type
    if hf.hidden_act != "silu":
        raise ValueError(f"hidden_act {hf.hidden_act!r} is not SiLU (SwiGLU is)")
    rope = hf.rope_parameters
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"rope_parameters: rope_type {rope_type!r} is not supported (default and llama3 are)"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters: partial_rotary_factor below 1 is not supported")
    # Mistral slides its window over every layer; Qwen2/3 only over layers marked so.
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    slides = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if slides and window < hf.max_position_embeddings:
        raise ValueError(
            f"sliding_window={window} is shorter than max_position_embeddings="
            f"{hf.max_position_embeddings}: sliding-window attention is not implemented "
            "(a window of null or at least the context is)"
        )
    attention_bias = getattr(hf, "attention_bias", False)  # Llama, Qwen3; Mistral has none
    head_dim = getattr(hf, "head_dim", None)  # Qwen2 may lack it: hidden / heads
    return GPTConfig(
        family=family,
        vocab_size=hf.vocab_size,
        n_positions=hf.max_position_embeddings,
        n_embd=hf.hidden_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads,
        head_size=None if head_dim in (None, hf.hidden_size / hf.num_attention_heads) else head_dim,
        n_inner=hf.intermediate_size,
        **_true_shape_from_hf(hf),
        dropout=hf.attention_dropout if dropout is None else dropout,
        layer_norm_epsilon=hf.rms_norm_eps,
        qkv_bias=family == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=getattr(hf, "mlp_bias", False),
        qk_norm=family == "qwen3",
        tie_word_embeddings=hf.tie_word_embeddings,
        rope_theta=rope["rope_theta"],
        rope_scaling=None
        if rope_type == "default"
        else RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        ),
    )


# Shapes of the HF hub's GPT-2 checkpoints (n_layer, n_embd, n_head), so that an estimate needs
# neither the network nor the weights; any other teacher must be a local HF folder.
GPT2_HUB_SHAPES = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


_LLAMA_32 = dict(
    family="llama", vocab_size=128_256, n_positions=131_072, n_inner=8192, dropout=0.0,
    n_kv_head=8, qkv_bias=False, out_bias=False, mlp_bias=False, rope_theta=500_000.0,
    rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
)  # fmt: skip
_QWEN_25 = dict(
    family="qwen2", vocab_size=151_936, n_positions=32_768, layer_norm_epsilon=1e-6, dropout=0.0,
    n_kv_head=2, out_bias=False, mlp_bias=False, rope_theta=1_000_000.0,
)  # fmt: skip
FAMILY_HUB_SHAPES = {
    "meta-llama/Llama-3.2-1B": GPTConfig(**_LLAMA_32, n_embd=2048, n_layer=16, n_head=32),
    "meta-llama/Llama-3.2-3B": GPTConfig(**_LLAMA_32, n_embd=3072, n_layer=28, n_head=24),
    "Qwen/Qwen2.5-0.5B": GPTConfig(**_QWEN_25, n_embd=896, n_layer=24, n_head=14, n_inner=4864),
    "Qwen/Qwen2.5-1.5B": GPTConfig(**_QWEN_25, n_embd=1536, n_layer=28, n_head=12, n_inner=8960),
}
"""The configs/ family pairs' hub checkpoints, as their ``config.json`` has them (the shape,
widths, heads and vocabulary the estimate needs), for the memory estimate offline."""


def pretrained_shape(name_or_path: str) -> GPTConfig:
    """The ``GPTConfig`` of an HF checkpoint without loading its weights: a local folder of any
    family in ``HF_CLASSES``, a GPT-2 hub name, or one of ``FAMILY_HUB_SHAPES``."""
    if Path(name_or_path).is_dir():
        return config_from_hf(_checked_hf_config(name_or_path))
    if name_or_path in FAMILY_HUB_SHAPES:
        return FAMILY_HUB_SHAPES[name_or_path]
    shape = GPT2_HUB_SHAPES.get(name_or_path.removeprefix("openai-community/"))
    if shape is None:
        known = sorted(GPT2_HUB_SHAPES) + sorted(FAMILY_HUB_SHAPES)
        raise ValueError(
            f"{name_or_path!r}: not a local HF folder nor one of {known}, so its shape is "
            "unknown offline"
        )
    n_layer, n_embd, n_head = shape
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


def config_to_hf(config: GPTConfig, *, eos_token_id: int | None = None) -> PretrainedConfig:
    """The HF config of ``config``'s family (``HF_CLASSES``)."""
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    if config.llama_like:
        return _llama_config_to_hf(config, eos)
    inner = _hf_inner(config)
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None if inner == 4 * config.n_embd else inner,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        activation_function="gelu_new",
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        **_true_shape_to_hf(config),
    )


def _true_shape_to_hf(config: GPTConfig) -> dict[str, list[int]]:
    """The true shape of a non-uniform model, for its HF config (HF itself sees the padded one);
    nothing for a uniform model."""
    shape = {}
    if any(h != config.n_head for h in config.layer_heads):
        shape["n_head_per_layer"] = list(config.layer_heads)
    if any(n != _hf_inner(config) for n in config.layer_inner):
        shape["n_inner_per_layer"] = list(config.layer_inner)
    return shape


def _llama_config_to_hf(config: GPTConfig, eos: int) -> PretrainedConfig:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(vars(config.rope_scaling))
    own = {  # what each class takes beyond the common keys (its config.json keys)
        "llama": {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias},
        "mistral": {"sliding_window": None},
        "qwen2": {"use_sliding_window": False},
        "qwen3": {"attention_bias": config.qkv_bias, "use_sliding_window": False},
    }[config.family]
    config_class, _ = HF_CLASSES[config.family]
    return config_class(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.n_positions,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        intermediate_size=_hf_inner(config),
        hidden_act="silu",
        rms_norm_eps=config.layer_norm_epsilon,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=eos,
        eos_token_id=eos,
        **own,
        **_true_shape_to_hf(config),
    )


def _hf_inner(config: GPTConfig) -> int:
    """HF's one FFN width: the widest block's."""
    return max(config.layer_inner, default=4 * config.n_embd)


def _fit(t: Tensor, shaped: Shaped, config: GPTConfig, units: int, *, name: str) -> Tensor:
    """Zero-pad or trim every part of the shaped block tensor ``t`` to ``units`` units (key/value
    groups or neurons); trimming refuses to drop a nonzero entry (that would change the model's
    outputs)."""
    dim, parts = shaped.dim, split_units(t, shaped, config)
    if all(part.shape[dim] == units for part in parts):
        return t
    fitted = []
    for part in parts:
        have = part.shape[dim]
        if units < have:
            if part.narrow(dim, units, have - units).any():
                raise CheckpointMismatchError(
                    f"tensor {name!r}: entries beyond the block's {units} {shaped.kind} (its "
                    "declared shape) are not zero, so they are not padding"
                )
            part = part.narrow(dim, 0, units)
        elif units > have:
            pad = list(part.shape)
            pad[dim] = units - have
            part = torch.cat([part, part.new_zeros(pad)], dim=dim)
        fitted.append(part)
    return join_units(fitted, dim)


def _block_units(config: GPTConfig, i: int, *, padded: bool) -> dict[str, int]:
    """Key/value groups and FFN neurons of block ``i``, true or padded to HF's shape."""
    heads = config.n_head if padded else config.layer_heads[i]
    inner = _hf_inner(config) if padded else config.layer_inner[i]
    return {"groups": heads // config.kv_groups, "neurons": inner}


def _fit_blocks(
    state: dict[str, Tensor], config: GPTConfig, *, padded: bool, hf_name: Callable[[str], str]
) -> dict[str, Tensor]:
    """``state`` (this model's names) with every block's shaped tensors padded to HF's shape or
    trimmed to the true one; an error names the tensor as ``hf_name`` gives it."""
    fitted = dict(state)
    for i in range(config.n_layer):
        units = _block_units(config, i, padded=padded)
        for suffix, shaped in SHAPED_TENSORS.items():
            name = f"blocks.{i}.{suffix}"
            if name in state:
                t = state[name]
                fitted[name] = _fit(t, shaped, config, units[shaped.kind], name=hf_name(name))
    return fitted


# (ours, HF) pieces of the Llama family's tensor names, replaced in this order (either way); the
# FFN's gate_proj, up_proj and down_proj keep their names. Our fused attn.qkv_proj becomes
# self_attn.{q,k,v}_proj, split or joined by the callers.
_LLAMA_RENAMES = (
    ("wte.", "model.embed_tokens."),
    ("ln_f.", "model.norm."),
    ("unembed.", "lm_head."),
    ("blocks.", "model.layers."),
    (".ln_1.", ".input_layernorm."),
    (".ln_2.", ".post_attention_layernorm."),
    (".attn.out_proj.", ".self_attn.o_proj."),
    (".attn.", ".self_attn."),  # q_norm, k_norm and the q, k, v projections
)


def _renamed(name: str, *, to_hf: bool) -> str:
    for ours, theirs in _LLAMA_RENAMES:
        old, new = (ours, theirs) if to_hf else (theirs, ours)
        if old in name:
            name = name.replace(old, new)
    return name


def _qkv_rows(config: GPTConfig) -> list[int]:
    """Rows of q, k and v in a block's fused ``qkv_proj``."""
    kv = config.kv_heads * config.head_dim
    return [config.n_head * config.head_dim, kv, kv]


def _hf_llama_name(name: str) -> str:
    """The HF name of one of this model's tensors (the fused q, k, v as a pattern)."""
    return _renamed(name, to_hf=True).replace("qkv_proj", "{q,k,v}_proj")


def _llama_state_from_hf(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    ours = {}
    for name, t in hf_state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding's own tensor
        ours[_renamed(name, to_hf=False)] = t
    for i in range(config.n_layer):
        for kind in ("weight", "bias"):
            parts = [f"blocks.{i}.attn.{p}_proj.{kind}" for p in "qkv"]
            if all(p in ours for p in parts):
                ours[f"blocks.{i}.attn.qkv_proj.{kind}"] = torch.cat([ours.pop(p) for p in parts])
    return _fit_blocks(ours, config, padded=False, hf_name=_hf_llama_name)


def _llama_state_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    padded = _fit_blocks(state, config, padded=True, hf_name=_hf_llama_name)
    theirs = {}
    for name, t in padded.items():
        if ".attn.qkv_proj." in name:
            for p, part in zip("qkv", t.split(_qkv_rows(config)), strict=True):
                theirs[_renamed(name.replace("qkv_proj", f"{p}_proj"), to_hf=True)] = part
        else:
            theirs[_renamed(name, to_hf=True)] = t
    if config.tie_word_embeddings:
        theirs["lm_head.weight"] = state["wte.weight"]
    return {k: v.contiguous() for k, v in theirs.items()}


def state_dict_from_hf(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """HF tensors of ``config``'s family -> this model's names and layouts; a GPT-2's padding is
    trimmed to ``config``'s shape."""
    if config.llama_like:
        return _llama_state_from_hf(hf_state, config)
    ours = {mine: hf_state[theirs] for mine, theirs in _TOP_TENSORS}
    for i in range(config.n_layer):
        for mine, theirs, transposed in _BLOCK_TENSORS:
            t = hf_state[f"transformer.h.{i}.{theirs}"]
            ours[f"blocks.{i}.{mine}"] = t.t() if transposed else t
    return _fit_blocks(ours, config, padded=False, hf_name=_hf_gpt2_name)


def state_dict_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """This model's tensors -> HF names and layouts of its family (a tied ``lm_head`` included); a
    GPT-2's blocks zero-padded to ``n_head`` heads and the widest FFN."""
    if config.llama_like:
        return _llama_state_to_hf(state, config)
    padded = _fit_blocks(state, config, padded=True, hf_name=str)
    theirs = {hf: state[mine] for mine, hf in _TOP_TENSORS}
    theirs["lm_head.weight"] = state["wte.weight"]
    for i in range(config.n_layer):
        for mine, hf, transposed in _BLOCK_TENSORS:
            t = padded[f"blocks.{i}.{mine}"]
            theirs[f"transformer.h.{i}.{hf}"] = t.t() if transposed else t
    return {k: v.contiguous() for k, v in theirs.items()}


def _hf_gpt2_name(name: str) -> str:
    """The HF GPT-2 name of one of this model's block tensors."""
    _, i, suffix = name.split(".", 2)
    hf = next(theirs for mine, theirs, _ in _BLOCK_TENSORS if mine == suffix)
    return f"transformer.h.{i}.{hf}"


def load_state_checked(model: GPT, state: dict[str, Tensor], *, source: str) -> None:
    """Copy ``state`` into ``model``, naming the tensor and both shapes on any mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(own[name].shape)} in the model"
            )
    model.load_state_dict(state)


def from_hf_model(
    hf_model: PreTrainedModel,
    *,
    config: GPTConfig | None = None,
    source: str = "HF model",
    **model_kwargs,
) -> GPT:
    """Build a GPT (fp32) holding the weights of an HF model of a family in ``HF_CLASSES``.

    With ``config`` given, the checkpoint must fit that shape; a mismatch names the tensor and
    both shapes.
    """
    try:
        hf_config = config_from_hf(hf_model.config)
    except ValueError as e:
        raise ValueError(f"{source}: config: {e}") from e
    model = GPT(config or hf_config, **model_kwargs)
    state = {k: v.float() for k, v in hf_model.state_dict().items()}
    try:
        ours = state_dict_from_hf(state, hf_config)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{source}: {e}") from e
    with torch.no_grad():
        load_state_checked(model, ours, source=source)
    return model


def _checked_hf_config(source: str) -> PretrainedConfig:
    """The HF config at ``source``, refused naming its architecture unless in ``HF_CLASSES``."""
    hf_config = AutoConfig.from_pretrained(source)
    if hf_config.model_type not in HF_CLASSES:
        architectures = ", ".join(hf_config.architectures or []) or "no architecture named"
        known = ", ".join(f"{t!r} ({c.__name__})" for t, (_, c) in HF_CLASSES.items())
        raise ModelFolderError(
            f"{source}: a {hf_config.model_type!r} model ({architectures}); ted_scale loads "
            f"these model types: {known}"
        )
    return hf_config


def load_pretrained(
    name_or_path: str | os.PathLike, *, config: GPTConfig | None = None, **model_kwargs
) -> GPT:
    """Load an HF checkpoint of a family in ``HF_CLASSES`` (a hub name such as ``gpt2``, or a
    local folder), fp32 on CPU.

    Another architecture, or a checkpoint whose weights do not all load (transformers would
    initialise the missing ones at random and go on), is refused naming it or the keys.
    """
    source = str(name_or_path)
    if Path(name_or_path).is_dir():
        check_model_folder(Path(name_or_path))
    hf_config = _checked_hf_config(source)
    _, model_class = HF_CLASSES[hf_config.model_type]
    hf_model, info = model_class.from_pretrained(
        source, config=hf_config, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}" for k, v in problems.items() if v)
        raise ModelFolderError(
            f"{source}: its weights do not all load into {model_class.__name__} ({found})"
        )
    return from_hf_model(hf_model, config=config, source=source, **model_kwargs)


def to_hf_model(model: GPT, *, eos_token_id: int | None = None) -> PreTrainedModel:
    """The HF model of ``model``'s family (``HF_CLASSES``) with its weights (fp32, CPU)."""
    _, model_class = HF_CLASSES[model.config.family]
    hf_model = model_class(config_to_hf(model.config, eos_token_id=eos_token_id))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state_dict_to_hf(state, model.config))
    hf_model.tie_weights()
    return hf_model


def export_hf(
    model: GPT, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Write ``model`` (and ``tokenizer``) as an HF folder that ``AutoModelForCausalLM`` loads.

    The folder is replaced whole (:func:`ted_scale.io.atomic_replace_dir`): a reader never sees
    half of it.
    """
    out_dir = Path(out_dir)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    hf_model = to_hf_model(model, eos_token_id=eos)
    with atomic_replace_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
