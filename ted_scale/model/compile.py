"""``torch.compile`` applied to a model block by block, as torchtitan does.

Each transformer block's forward is compiled on its own: one compiled function serves every block
(same code and shapes, parameters as graph inputs), the graph stays small enough to compile in
seconds, and everything around the blocks (embeddings, the final LayerNorm, the fused LM-head
losses with their hand-written autograd, DeepSpeed's ZeRO hooks, activation checkpointing) runs
eagerly around the compiled code. On CUDA inductor emits Triton kernels; on a CPU, C++/OpenMP.
"""

from __future__ import annotations

import functools
import types

import torch

from ted_scale.model.gpt import GPT, Block


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """``None`` (auto) compiles on CUDA only: on a CPU the compile time rarely pays for itself."""
    return device.type == "cuda" if setting is None else setting


@functools.cache
def _compiled_block_forward():
    return torch.compile(Block.forward)


def compile_blocks(model: GPT) -> GPT:
    """Compile every block's forward in place. The compiled forward is bound to each block as a
    method, so a deep copy of the model (filters copy blocks) stays compiled and runs its own
    weights; the state dict is unchanged."""
    for block in model.blocks:
        block.forward = types.MethodType(_compiled_block_forward(), block)
    return model
