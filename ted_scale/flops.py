"""FLOPs per token of the pieces of a training step, and the peak rates MFU is measured against.

Counting convention (as in the PaLM/Megatron papers): a matmul of [m, k] x [k, n] costs 2mkn FLOPs;
a backward pass costs twice its forward (gradients for inputs and weights). Per token, counted from
the modules themselves so that any shape (pruned heads, other FFN widths, any filter) is right:

- every ``nn.Linear`` d_in -> d_out: 2 d_in d_out (a GPT-2 block's four projections: 24 d^2; a
  Llama-family block's, with q heads and kv key/value heads of width h_d and a SwiGLU FFN f wide:
  q, k, v 2d (q + 2 kv) h_d, output 2 q h_d d, gate, up and down 6 d f);
- every attention layer of inner width h (query heads x head_dim) over context T: 4 T h (scores
  Q K^T and the weighted sum of values, 2 T h each; grouped-query attention shares K and V among
  query heads, which saves projections, not this). The whole T x T score matrix is counted, causal mask
  or not, as PaLM (appendix B) and Megatron count it, so MFU compares with published MFU; kernels
  that skip the masked half do less work than counted;
- an LM head application: 2 V d (the token embedding, or an untied head of its own: counted by
  ``head_flops`` only, never as a block's linear);
- a prefix sub-network (``GPT.forward(subnet=...)``): each block's attention and FFN counted as
  above, scaled by the fraction of its heads and neurons that take part (both are linear in them:
  heads go in whole key/value groups, so the q, k, v and output projections shrink alike, and a
  SwiGLU neuron takes its gate, up and down weights with it).

Frozen modules run forward only (1x); trained modules forward and backward (3x). Heads whose
weight is frozen still need the input gradient; they are counted as a full backward for
simplicity (a 2x-vs-3x difference on one matmul). Each method sums these in its own FLOP count
(``ted_scale.distill.methods``).
"""

from __future__ import annotations

import torch
from torch import nn

from ted_scale.model.gpt import GPT, CausalSelfAttention, Subnet
from ted_scale.model.tp_layout import ShardedLinear

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
}

TRAINED = 3.0  # forward + backward
FROZEN = 1.0  # forward only


def forward_flops(module: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of every linear layer and attention inside ``module``."""
    total = 0.0
    for m in module.modules():
        if isinstance(m, nn.Linear | ShardedLinear):
            for weight in _weights(m):
                d_out, d_in = _shape(weight)
                total += 2 * d_in * d_out
        elif isinstance(m, CausalSelfAttention):
            width = sum(_shape(weight)[0] for weight in _weights(m.qkv_proj))
            total += 4 * seq_len * m.query_heads(width) * m.head_dim
    return total


def _weights(linear: nn.Module) -> tuple[torch.Tensor, ...]:
    """The weights [d_out, d_in] a linear layer multiplies its input by: its own, or on this rank
    the shard of a tensor-parallel one (with its key/value copy, ``KVReplicatedLinear``)."""
    return linear.matmul_weights if isinstance(linear, ShardedLinear) else (linear.weight,)


def subnet_flops(model: GPT, subnet: Subnet, seq_len: int) -> float:
    """Forward FLOPs per token of ``model``'s blocks running only the prefix ``subnet``."""
    total = 0.0
    for block, heads, inner in zip(model.blocks, subnet.heads, subnet.inner, strict=True):
        if block.attn.n_head:
            total += forward_flops(block.attn, seq_len) * heads / block.attn.n_head
        if block.mlp.n_inner:
            total += forward_flops(block.mlp, seq_len) * inner / block.mlp.n_inner
    return total


def head_flops(model: GPT) -> float:
    """Forward FLOPs per token of one application of the LM head [d] -> [V] the losses use
    (``GPT.loss_head``), on this rank: a head sharded by vocabulary (tensor parallelism) counts
    its own rows, the whole head of a teacher split apart from its student all of them."""
    layout = model.tensor_parallel
    whole = layout is None or layout.whole_head is not None
    rows, width = _shape(model.lm_head_weight if layout is None else model.loss_head()[0])
    if whole and model.vocab_in_use is not None:  # read off the parameter: ZeRO-3 partitions it
        rows = model.vocab_in_use
    return 2 * rows * width


def batch_factor(model: GPT) -> int:
    """Micro-batches ``model`` runs for each of this rank's: its group's size when it runs on the
    group's gathered batch (a teacher split apart from its student, each rank then doing a
    1/size share of the work of size micro-batches), else 1."""
    layout = model.tensor_parallel
    return layout.size if layout is not None and layout.gathers_batch else 1


def _shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The weight's shape on this rank, also while ZeRO-3 holds it partitioned (``ds_shape``)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of this GPU, or None (CPU, or a GPU not in the table: no MFU reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(word in name for word in key.split()):
            return PEAK_BF16_TFLOPS[key]
    if "H100" in name:
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None
