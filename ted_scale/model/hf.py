"""Conversion between this GPT and Hugging Face's ``GPT2LMHeadModel``.

HF's GPT-2 stores its projections as ``Conv1D`` (weight [in, out]); ours are ``nn.Linear``
(weight [out, in]), so those weights are transposed on the way in and out.

A model of non-uniform shape (docs/design.md "Models of non-uniform shape") is exported zero-padded
to ``n_head`` heads and the widest FFN in every block: a padded head has zero q, k, v and output
weights and a padded neuron zero weights and bias, so it adds exactly nothing (gelu(0) = 0) and HF
computes the same logits. transformers 5 has no head pruning (``pruned_heads`` is gone) and GPT-2
has one ``n_inner`` for all blocks, so padding is the exact form HF loads. The true shape is kept in
the config as ``n_head_per_layer`` / ``n_inner_per_layer`` (keys HF ignores), and import trims the
padding back, refusing if a padded entry is not zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from ted_scale.io import atomic_replace_dir
from ted_scale.model.gpt import GPT, SHAPED_TENSORS, GPTConfig

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
    model that is not GPT-2 or whose weights do not all load."""


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


def config_from_hf(hf_config: GPT2Config, *, dropout: float | None = None) -> GPTConfig:
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
        n_head_per_layer=getattr(hf_config, "n_head_per_layer", None),
        n_inner_per_layer=getattr(hf_config, "n_inner_per_layer", None),
    )


# Shapes of the HF hub's GPT-2 checkpoints (n_layer, n_embd, n_head), so that an estimate needs
# neither the network nor the weights; any other teacher must be a local HF folder.
GPT2_HUB_SHAPES = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


def pretrained_shape(name_or_path: str) -> GPTConfig:
    """The ``GPTConfig`` of an HF GPT-2 (hub name or local folder) without loading its weights."""
    if Path(name_or_path).is_dir():
        return config_from_hf(GPT2Config.from_pretrained(name_or_path))
    shape = GPT2_HUB_SHAPES.get(name_or_path.removeprefix("openai-community/"))
    if shape is None:
        raise ValueError(
            f"{name_or_path!r}: not a local HF folder nor one of {sorted(GPT2_HUB_SHAPES)}, so "
            "its shape is unknown offline"
        )
    n_layer, n_embd, n_head = shape
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


def config_to_hf(config: GPTConfig, *, eos_token_id: int | None = None) -> GPT2Config:
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    inner = _hf_inner(config)
    shape = {}  # the true shape of a non-uniform model; HF itself sees the padded one
    if any(h != config.n_head for h in config.layer_heads):
        shape["n_head_per_layer"] = list(config.layer_heads)
    if any(n != inner for n in config.layer_inner):
        shape["n_inner_per_layer"] = list(config.layer_inner)
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
        **shape,
    )


def _hf_inner(config: GPTConfig) -> int:
    """HF's one FFN width: the widest block's."""
    return max(config.layer_inner, default=4 * config.n_embd)


def _fit(t: Tensor, dim: int, groups: int, size: int, *, name: str) -> Tensor:
    """Zero-pad or trim each of the ``groups`` equal parts of ``t`` along ``dim`` to ``size``;
    trimming refuses to drop a nonzero entry (that would change the model's outputs)."""
    parts = t.unflatten(dim, (groups, t.shape[dim] // groups))
    have = parts.shape[dim + 1]
    if size < have:
        if parts.narrow(dim + 1, size, have - size).any():
            raise CheckpointMismatchError(
                f"tensor {name!r}: entries beyond width {size} (the block's declared shape) are "
                "not zero, so they are not padding"
            )
        parts = parts.narrow(dim + 1, 0, size)
    elif size > have:
        pad = list(parts.shape)
        pad[dim + 1] = size - have
        parts = torch.cat([parts, parts.new_zeros(pad)], dim=dim + 1)
    return parts.flatten(dim, dim + 1)


def _block_widths(config: GPTConfig, i: int, *, padded: bool) -> dict[str, int]:
    """Widths of block ``i``'s head- and neuron-shaped tensors, true or padded to HF's shape."""
    heads = config.n_head if padded else config.layer_heads[i]
    inner = _hf_inner(config) if padded else config.layer_inner[i]
    return {"heads": heads * config.head_dim, "inner": inner}


def state_dict_from_hf(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """HF GPT-2 tensors -> this model's names and layouts, padding trimmed to ``config``'s shape."""
    ours = {mine: hf_state[theirs] for mine, theirs in _TOP_TENSORS}
    for i in range(config.n_layer):
        widths = _block_widths(config, i, padded=False)
        for mine, theirs, transposed in _BLOCK_TENSORS:
            name = f"transformer.h.{i}.{theirs}"
            t = hf_state[name].t() if transposed else hf_state[name]
            if mine in SHAPED_TENSORS:
                dim, groups, kind = SHAPED_TENSORS[mine]
                t = _fit(t, dim, groups, widths[kind], name=name)
            ours[f"blocks.{i}.{mine}"] = t
    return ours


def state_dict_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """This model's tensors -> HF GPT-2 names and layouts (the tied ``lm_head`` included), each
    block zero-padded to ``n_head`` heads and the widest FFN."""
    theirs = {hf: state[mine] for mine, hf in _TOP_TENSORS}
    theirs["lm_head.weight"] = state["wte.weight"]
    for i in range(config.n_layer):
        widths = _block_widths(config, i, padded=True)
        for mine, hf, transposed in _BLOCK_TENSORS:
            name = f"blocks.{i}.{mine}"
            t = state[name]
            if mine in SHAPED_TENSORS:
                dim, groups, kind = SHAPED_TENSORS[mine]
                t = _fit(t, dim, groups, widths[kind], name=name)
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


def load_pretrained(
    name_or_path: str | os.PathLike, *, config: GPTConfig | None = None, **model_kwargs
) -> GPT:
    """Load an HF GPT-2 checkpoint (a hub name such as ``gpt2``, or a local folder), fp32 on CPU.

    Another architecture, or a checkpoint whose weights do not all load (transformers would
    initialise the missing ones at random and go on), is refused naming it or the keys.
    """
    source = str(name_or_path)
    if Path(name_or_path).is_dir():
        check_model_folder(Path(name_or_path))
    hf_config = AutoConfig.from_pretrained(source)
    if hf_config.model_type != "gpt2":
        architectures = ", ".join(hf_config.architectures or []) or "no architecture named"
        raise ModelFolderError(
            f"{source}: a {hf_config.model_type!r} model ({architectures}); ted_scale loads "
            "GPT-2 checkpoints (model_type 'gpt2', GPT2LMHeadModel)"
        )
    hf_model, info = GPT2LMHeadModel.from_pretrained(
        source, config=hf_config, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{k.replace('_', ' ')}: {v[:5]}" for k, v in problems.items() if v)
        raise ModelFolderError(f"{source}: its weights do not all load into GPT-2 ({found})")
    return from_hf_model(hf_model, config=config, source=source, **model_kwargs)


def to_hf_model(model: GPT, *, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with this model's weights (fp32, CPU)."""
    hf_model = GPT2LMHeadModel(config_to_hf(model.config, eos_token_id=eos_token_id))
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
