"""The per-GPU memory estimate (ted_scale/parallel/memory_per_gpu.py) against real models and the paper's
activation formula, and its command on a shipped config."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ted_scale.model.gpt import GPT, Block, GPTConfig
from ted_scale.parallel.memory_per_gpu import (
    TP_SPLIT_DIM,
    Layout,
    block_activation_bytes,
    estimate_memory,
    format_table,
    meta_gpt,
    params_per_rank,
)
from ted_scale.parallel.tensor import check_shardable, padded_vocab_size
from ted_scale.train.memory_check import run_memory_table

REPO = Path(__file__).resolve().parents[1]


def shard(name: str, t: torch.Tensor, config: GPTConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of parameter ``name`` under Megatron's scheme, cut from the tensor:
    [q; k; v] by heads, the vocabulary padded with zero rows, row-parallel biases whole."""
    if name == "wte.weight":
        rows = padded_vocab_size(t.shape[0], tp) - t.shape[0]
        return F.pad(t, (0, 0, 0, rows)).chunk(tp, dim=0)[rank]
    if name.endswith("attn.qkv_proj.weight") or name.endswith("attn.qkv_proj.bias"):
        per_head = t.view(3, -1, config.head_dim, *t.shape[1:])  # [3, heads, head_dim, (d)]
        return per_head.chunk(tp, dim=1)[rank]
    if name.endswith("attn.out_proj.weight"):
        return t.view(t.shape[0], -1, config.head_dim).chunk(tp, dim=1)[rank]
    if name.endswith(("mlp.up_proj.weight", "mlp.up_proj.bias")):
        return t.chunk(tp, dim=0)[rank]
    if name.endswith("mlp.down_proj.weight"):
        return t.chunk(tp, dim=1)[rank]
    return t


PRUNED = GPTConfig(
    vocab_size=101,
    n_positions=64,
    n_embd=48,
    n_layer=4,
    n_head=4,
    n_head_per_layer=[4, 2, 2, 4],
    n_inner_per_layer=[192, 96, 64, 32],
)


@pytest.mark.parametrize("pruned", [False, True], ids=["uniform", "pruned"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_params_per_rank_equal_the_cut_pieces_of_a_real_gpt(tiny_gpt, pruned, tp):
    model = GPT(PRUNED) if pruned else tiny_gpt
    if pruned and tp == 4:
        with pytest.raises(
            ValueError, match=r"does not divide the model's attention heads in block 1 \(2\)"
        ):
            check_shardable(model.config, tp, "model")
        return
    pieces = [
        sum(shard(n, p, model.config, tp, r).numel() for n, p in model.named_parameters())
        for r in range(tp)
    ]
    assert pieces == [params_per_rank(model, tp)] * tp
    # The whole model back: all pieces of the split tensors, one copy of the rest, the padding.
    split = sum(p.numel() for n, p in model.named_parameters() if n.endswith(tuple(TP_SPLIT_DIM)))
    padding = (padded_vocab_size(101, tp) - 101) * 48
    assert (
        sum(pieces) == tp * (model.num_params(exclude_embeddings=False) - split) + split + padding
    )


def test_params_per_rank_exact_numbers(tiny_gpt):
    # vocab 101 -> 256 at tp 2; width 48, 4 heads of 12, FFN 192, 4 blocks, 64 positions.
    wte, wpe, ln_f = 256 * 48 // 2, 64 * 48, 2 * 48
    block = (
        2 * 2 * 48  # ln_1, ln_2
        + (3 * 48 * 48 + 3 * 48) // 2  # qkv_proj, column-parallel by heads
        + 48 * 48 // 2
        + 48  # out_proj, row-parallel; bias whole
        + (192 * 48 + 192) // 2  # up_proj, column-parallel
        + 48 * 192 // 2
        + 48  # down_proj, row-parallel; bias whole
    )
    assert params_per_rank(tiny_gpt, 2) == wte + wpe + ln_f + 4 * block == 66_432
    assert params_per_rank(tiny_gpt, 1) == tiny_gpt.num_params(exclude_embeddings=False)


def test_padded_vocabulary_is_megatrons():
    assert padded_vocab_size(50257, 1) == 50257
    assert padded_vocab_size(50257, 2) == 50432  # 197 x 256
    assert padded_vocab_size(50257, 5) == 50560  # 79 x 640
    assert padded_vocab_size(512, 2) == 512


def test_tensor_parallelism_divides_the_split_part_and_keeps_the_rest():
    teacher = meta_gpt(GPTConfig(n_layer=48, n_embd=1600, n_head=25))
    student = meta_gpt(GPTConfig(n_layer=24, n_embd=1600, n_head=25))
    assert teacher.num_params(exclude_embeddings=False) == 1_557_611_200  # GPT-2 XL
    with pytest.raises(ValueError, match=r"attention heads in block 0 \(25\)"):
        estimate_memory(teacher, student, Layout(tp=2))
    whole = params_per_rank(student, 1)
    replicated = sum(
        p.numel() for n, p in student.named_parameters() if not n.endswith(tuple(TP_SPLIT_DIM))
    )
    padding = (padded_vocab_size(50257, 5) - 50257) * 1600
    assert params_per_rank(student, 5) == replicated + (whole - replicated + padding) // 5
    one, five = (estimate_memory(teacher, student, Layout(tp=t, dp=2)) for t in (1, 5))
    for part in ("teacher weights (frozen)", "student weights (fp32)", "student gradients (fp32)"):
        assert 4.9 < one.parts[part] / five.parts[part] < 5.0, part  # replicated part kept
    acts = "student activations (one micro-batch)"
    assert one.parts[acts] / 5 < five.parts[acts] < one.parts[acts]  # LayerNorm regions kept
    with_sp = estimate_memory(teacher, student, Layout(tp=5, dp=2, sequence_parallel=True))
    assert with_sp.parts[acts] < five.parts[acts]
    # ZeRO divides what it partitions by dp, and only that.
    zero1, zero2 = (estimate_memory(teacher, student, Layout(dp=8, zero_stage=s)) for s in (1, 2))
    assert zero2.parts["student gradients (fp32)"] * 8 == zero1.parts["student gradients (fp32)"]
    assert zero2.parts["optimizer (fp32 copy + AdamW m, v)"] == whole * 12 // 8
    # Activation checkpointing keeps each block's fp32 input and one block's activations.
    ckpt = estimate_memory(teacher, student, Layout(activation_checkpointing=True))
    assert ckpt.parts[acts] < one.parts[acts] / 5


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (4, False), (4, True)])
def test_block_activations_are_korthikantis_with_fp32_layernorm_inputs(tp, sp):
    # Korthikanti et al. 2022, Eq. 2 / 4 / 5: s b h (10 + 24/t + 5 a s / (h t)) bytes per layer,
    # all over t with sequence parallelism; this model adds 2 x 2 bytes for its fp32 LayerNorm
    # inputs and 16 bytes per token of LayerNorm statistics (replicated).
    s, b, h, a = 256, 4, 128, 8
    layout = Layout(tp=tp, micro_batch=b, seq_len=s, flash_attention=False, sequence_parallel=sp)
    got = block_activation_bytes(GPTConfig(n_embd=h, n_head=a, dropout=0.1), layout)
    region = s * b * (10 * h + 4 * h + 16)
    paper = region / (tp if sp else 1) + s * b * h * (24 + 5 * a * s / h) / tp
    assert got == paper


# Blocks of every kind the estimate tells apart (width 64, 4 query heads).
BLOCKS = {
    "gpt2": {},
    # RMSNorm, RoPE, SwiGLU 128 wide, 2 key/value heads.
    "llama": dict(family="llama", n_kv_head=2, n_inner=128, qkv_bias=False, out_bias=False,
                  mlp_bias=False),
    # The same with one key/value head, heads 32 wide and q/k norms.
    "qwen3": dict(family="qwen3", n_kv_head=1, head_size=32, n_inner=128, qkv_bias=False,
                  out_bias=False, mlp_bias=False, qk_norm=True),
}  # fmt: skip


@pytest.mark.parametrize("compute_bytes", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", BLOCKS)
def test_block_activations_equal_what_autograd_saves(family, compute_bytes, one_thread):
    """Every tensor a real block saves for its backward, under bf16 autocast or in fp32, counted
    once per storage, against the estimate (no dropout: CPU dropout keeps bf16 masks, CUDA bool
    ones)."""
    config = GPTConfig(
        vocab_size=64, n_positions=32, n_embd=64, n_head=4, n_layer=1, dropout=0.0,
        **BLOCKS[family],
    )  # fmt: skip
    block = Block(config, 0).train()
    block.attn.implementation = "sdpa"
    B, T = 2, 16
    # Weights (and autocast's copies of them, either orientation) are counted apart, and the
    # rotary tables [T, head_dim] left out; no activation has these shapes (their rows are the
    # 32 tokens).
    left_out = {s for p in block.parameters() for s in (p.shape, p.shape[::-1])}
    left_out.add(torch.Size([T, config.head_dim]))
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape not in left_out:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.stride(), t.shape)
            saved[key] = t.numel() * t.element_size()
        return t

    x = torch.randn(B, T, 64, requires_grad=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_bytes == 2)
    with hooks, autocast:
        block(x)
    estimate = block_activation_bytes(
        config, Layout(micro_batch=B, seq_len=T, compute_bytes=compute_bytes)
    )
    # CPU SDPA returns its output head-major, so the reshape before out_proj copies it; flash-attn
    # and CUDA SDPA return it token-major and the reshape is a view.
    reshaped = B * T * compute_bytes * config.n_head * config.head_dim
    assert sum(saved.values()) == estimate + reshaped


def estimate_memory_command(capsys, *args: str) -> tuple[int, str, str]:
    """launch/estimate_memory.py run in this process: (exit status, stdout, stderr)."""
    main = runpy.run_path(str(REPO / "launch" / "estimate_memory.py"))["main"]
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_the_command_prints_the_xl_table(capsys):
    xl = str(REPO / "configs" / "gpt2-xl-ted-owt.yaml")
    status, out, _ = estimate_memory_command(capsys, "--config", xl, "--world", "8", "--tp", "1,4")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "| GiB per GPU | tp=1 dp=8 | tp=4 dp=2 |"
    # 25 heads padded to 28 at tp 4: a quarter of 28/25 of the attention weights per rank.
    assert "| teacher weights (frozen) | 2.9 | 0.8 |" in lines
    status, _, err = estimate_memory_command(
        capsys,
        "--config",
        xl,
        "--world",
        "2",
        "--tp",
        "2",
        "parallel.tensor_parallel_padding=false",
    )
    assert status == 2
    assert "does not divide the teacher's attention heads in block 0 (25)" in err
    assert "parallel.tensor_parallel_padding: true" in err


def test_the_table_has_a_column_per_layout(tiny_data):
    from ted_scale.distill.methods import load_run_config

    config = load_run_config(REPO / "configs" / "tiny-ted.yaml", [f"data.path={tiny_data}"])
    table = run_memory_table(config, tps=[1, 2], world=2, seq_len=64, gpus_gib=[3.0], with_sp=True)
    rows = {}
    for line in table.splitlines():
        name, *cells = (cell.strip(" *") for cell in line.strip("|").split("|"))
        rows[name] = cells
    assert rows["GiB per GPU"] == ["tp=1 dp=2", "tp=2 dp=1", "tp=2 dp=1 sp"]
    assert rows["fits in 3 GiB"] == ["yes", "yes", "yes"]
    # DeepSpeed's 5e8-element fp32 gradient bucket dominates a tiny model (ZeRO-1).
    assert rows["ZeRO gradient bucket (fp32)"] == ["1.9", "1.9", "1.9"]
    largest = [int(c) for c in rows["largest micro-batch in 3 GiB"]]
    assert largest[0] < largest[1] < largest[2]


def test_a_teacher_split_apart_holds_its_shards_and_whole_head_beside_a_whole_student():
    teacher = meta_gpt(GPTConfig(n_layer=8, n_embd=256, n_head=8, vocab_size=1000))
    student = meta_gpt(GPTConfig(n_layer=2, n_embd=256, n_head=8, vocab_size=1000))
    shared = estimate_memory(teacher, student, Layout(tp=1, dp=4))
    apart = estimate_memory(teacher, student, Layout(tp=1, dp=4, teacher_tp=4))
    whole_head = 2 * 1000 * 256  # bf16 rows of the true vocabulary
    assert apart.parts["teacher weights (frozen)"] == 2 * params_per_rank(teacher, 4) + whole_head
    for part, size in shared.parts.items():  # the student's side is that of tp 1
        if part != "teacher weights (frozen)":
            assert apart.parts[part] == size, part
    assert "tp=1 dp=4 teacher tp=4" in format_table([apart], {})


def test_the_command_adds_a_column_per_teacher_split_apart_and_the_flop_split(capsys):
    xl = str(REPO / "configs" / "gpt2-xl-ted-owt.yaml")
    args = ["--config", xl, "--world", "8", "--tp", "1,4", "--teacher-tp", "4"]
    status, out, _ = estimate_memory_command(capsys, *args)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "| GiB per GPU | tp=1 dp=8 | tp=4 dp=2 | tp=1 dp=8 teacher tp=4 |"
    # Its shards (28 heads padded, a quarter each) and its whole head: 0.8 + 0.15 GiB.
    assert "| teacher weights (frozen) | 2.9 | 0.8 | 0.9 |" in lines
    assert "| student weights (fp32) | 3.1 | 0.8 | 3.1 |" in lines
    assert lines[-1].startswith("FLOPs per token at sequence length 1024: teacher forward 3.42 G")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_optimizer_bytes_are_what_deepspeed_holds(tiny_config, one_thread, stage):
    """The trainer's DeepSpeed engine after a step: AdamW's m and v, and under ZeRO its fp32 copy
    of the (here whole, dp = 1) partition, byte for byte."""
    from ted_scale.distill.methods import load_run_config
    from ted_scale.parallel import init_parallel
    from ted_scale.train.engine import build_engine

    torch.manual_seed(0)
    model = GPT(tiny_config).train()
    batch = ["batch.global_batch_size=2", "batch.micro_batch_size=2"]
    config = load_run_config(None, [f"deepspeed.zero_stage={stage}", *batch])
    engine, _ = build_engine(model, config, init_parallel(1), total_steps=2, lr=1e-3)
    engine.backward(engine(torch.randint(0, 101, (2, 16))).logits.square().mean())
    engine.step()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    model_weights = {p.data_ptr() for p in model.parameters()}
    held = sum(
        p.numel() * p.element_size()
        for group in inner.param_groups
        for p in group["params"]
        if p.data_ptr() not in model_weights
    ) + sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )
    shape = meta_gpt(tiny_config)
    estimate = estimate_memory(shape, shape, Layout(zero_stage=stage))
    assert held == estimate.parts["optimizer (fp32 copy + AdamW m, v)"]
    assert held == (8 if stage == 0 else 12) * model.num_params(exclude_embeddings=False)


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("Qwen/Qwen2.5-0.5B", 0.494),
        ("Qwen/Qwen2.5-1.5B", 1.544),
        ("meta-llama/Llama-3.2-1B", 1.236),
        ("meta-llama/Llama-3.2-3B", 3.213),
    ],
)
def test_the_family_pairs_hub_shapes_have_their_published_sizes(name, billions):
    from ted_scale.model.hf import pretrained_shape

    model = meta_gpt(pretrained_shape(name))
    assert model.num_params(exclude_embeddings=False) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_the_family_configs_estimate_offline(capsys):
    for name in ("qwen2.5-1.5b-to-0.5b-ted.yaml", "llama-3.2-3b-to-1b-ted.yaml"):
        args = ["--config", str(REPO / "configs" / name), "--world", "8", "--tp", "1"]
        status, out, err = estimate_memory_command(capsys, *args)
        assert status == 0, err
        assert out.splitlines()[0] == "| GiB per GPU | tp=1 dp=8 |"
