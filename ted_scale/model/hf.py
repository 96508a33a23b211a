"""Conversion between this GPT and Hugging Face's ``GPT2LMHeadModel``.

HF's GPT-2 stores its projections as ``Conv1D`` (weight [in, out]); ours are ``nn.Linear``
(weight [out, in]), so those weights are transposed on the way in and out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from ted_scale.io import atomic_replace_dir
from ted_scale.model.gpt import GPT, GPTConfig

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
    """A local HF model folder lacks a file, or holds a truncated or unreadable one."""


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
    weights = folder / "model.safetensors"
    if not weights.is_file():
        if (folder / "model.safetensors.index.json").is_file():
            return
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ModelFolderError(f"{weights}: missing (the folder holds {found})")
    try:
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{weights}: truncated or not a safetensors file ({e})") from None


def config_from_hf(hf_config: GPT2Config, *, dropout: float | None = None) -> GPTConfig:
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"n_inner={hf_config.n_inner} is not supported (only 4 * n_embd)")
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {hf_config.activation_function!r} is not tanh-GELU")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        dropout=hf_config.resid_pdrop if dropout is None else dropout,
        layer_norm_epsilon=hf_config.layer_norm_epsilon,
    )


def config_to_hf(config: GPTConfig, *, eos_token_id: int | None = None) -> GPT2Config:
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        activation_function="gelu_new",
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )


def state_dict_from_hf(hf_state: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """HF GPT-2 tensors -> this model's names and layouts."""
    ours = {mine: hf_state[theirs] for mine, theirs in _TOP_TENSORS}
    for i in range(n_layer):
        for mine, theirs, transposed in _BLOCK_TENSORS:
            t = hf_state[f"transformer.h.{i}.{theirs}"]
            ours[f"blocks.{i}.{mine}"] = t.t() if transposed else t
    return ours


def state_dict_to_hf(state: dict[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """This model's tensors -> HF GPT-2 names and layouts (the tied ``lm_head`` included)."""
    theirs = {hf: state[mine] for mine, hf in _TOP_TENSORS}
    theirs["lm_head.weight"] = state["wte.weight"]
    for i in range(n_layer):
        for mine, hf, transposed in _BLOCK_TENSORS:
            t = state[f"blocks.{i}.{mine}"]
            theirs[f"transformer.h.{i}.{hf}"] = t.t() if transposed else t
    return {k: v.contiguous() for k, v in theirs.items()}


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
    hf_model: GPT2LMHeadModel,
    *,
    config: GPTConfig | None = None,
    source: str = "HF model",
    **model_kwargs,
) -> GPT:
    """Build a GPT (fp32) holding the weights of a ``GPT2LMHeadModel``.

    With ``config`` given, the checkpoint must fit that shape; a mismatch names the tensor and
    both shapes.
    """
    hf_config = config_from_hf(hf_model.config)
    model = GPT(config or hf_config, **model_kwargs)
    state = {k: v.float() for k, v in hf_model.state_dict().items()}
    with torch.no_grad():
        load_state_checked(model, state_dict_from_hf(state, hf_config.n_layer), source=source)
    return model


def load_pretrained(
    name_or_path: str | os.PathLike, *, config: GPTConfig | None = None, **model_kwargs
) -> GPT:
    """Load an HF GPT-2 checkpoint (a hub name such as ``gpt2``, or a local folder), fp32 on CPU."""
    if Path(name_or_path).is_dir():
        check_model_folder(Path(name_or_path))
    hf_model = GPT2LMHeadModel.from_pretrained(str(name_or_path), dtype=torch.float32)
    return from_hf_model(hf_model, config=config, source=str(name_or_path), **model_kwargs)


def to_hf_model(model: GPT, *, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with this model's weights (fp32, CPU)."""
    hf_model = GPT2LMHeadModel(config_to_hf(model.config, eos_token_id=eos_token_id))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(state_dict_to_hf(state, model.config.n_layer))
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
