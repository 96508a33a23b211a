"""Tensor parallelism on CPU ranks (gloo): sharding, forward equality with one process, gathering."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from torch import Tensor
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ted_scale.model import GPT, GPTConfig
from ted_scale.model.gpt import Subnet
from ted_scale.parallel.dims import ParallelDims, ParallelLayoutError
from ted_scale.parallel.tensor import (
    TEACHER_TP_SIZE_KEY,
    check_shardable,
    kv_split,
    pad_for_tensor_parallel,
    padded_kv_heads,
)

# name -> (shape, pad): the vocabulary needs padding (300 -> 512 at tp 2) / nothing does /
# heads, FFN width and vocabulary all do (3 and 1 heads, 131 and 7 neurons: a pruned model's).
SHAPES = {
    "padded_vocab": (
        GPTConfig(vocab_size=300, n_positions=16, n_embd=32, n_layer=2, n_head=4, dropout=0.0),
        False,
    ),
    "aligned_vocab": (
        GPTConfig(
            vocab_size=512, n_positions=16, n_embd=64, n_layer=2, n_head=2, n_inner=96, dropout=0.0
        ),
        False,
    ),
    "padded_heads_ffn_vocab": (
        GPTConfig(
            vocab_size=300,
            n_positions=16,
            n_embd=48,
            n_layer=2,
            n_head=3,
            dropout=0.0,
            n_head_per_layer=[3, 1],
            n_inner_per_layer=[131, 7],
        ),
        True,
    ),
}


def _gather_logits(local, shard):
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, local.contiguous(), group=shard.group)
    return torch.cat(parts, dim=-1)[..., : shard.vocab_size]


def _forward_matches(config: GPTConfig, pad: bool) -> None:
    from ted_scale.parallel import init_parallel
    from ted_scale.parallel.tensor import parallelize_gpt

    dims = init_parallel(2)
    torch.manual_seed(0)
    model = GPT(config)
    for p in model.parameters():  # random biases too: padding must not touch real units
        torch.nn.init.normal_(p, std=0.1)
    reference = copy.deepcopy(model)
    parallelize_gpt(model, dims, "student", pad=pad)
    ids = _assert_sharded_forward_matches(model, reference)
    # A prefix sub-network (MiniDisc's candidates): rank 0 holds all of its heads in block 0.
    subnet = Subnet(heads=(1, 1), inner=tuple(n // 2 for n in config.layer_inner))
    got, want = model(ids, subnet=subnet).logits, reference(ids, subnet=subnet).logits
    torch.testing.assert_close(_gather_logits(got, model.vocab_shard), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def _assert_sharded_forward_matches(model: GPT, reference: GPT) -> Tensor:
    """``model`` (sharded) gives ``reference``'s (whole) hidden states, logits and token scores,
    and gathers back to its state exactly; returns the input ids [2, 12] it ran on."""
    from ted_scale.eval.scoring import score_tokens
    from ted_scale.parallel.tensor import gathered_state

    config = reference.config
    draw = torch.Generator().manual_seed(0)  # the same on every rank
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=draw)
    layers = list(range(config.n_layer))
    out = model(ids, output_layers=layers)
    want = reference(ids, output_layers=layers)
    torch.testing.assert_close(_gather_logits(out.logits, model.vocab_shard), want.logits,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    for i in layers:
        torch.testing.assert_close(
            out.hidden_states[i], want.hidden_states[i], rtol=1e-5, atol=1e-5
        )
    targets = torch.randint(0, config.vocab_size, ids.shape, generator=draw)
    targets[0, :3] = -100  # not scored
    got, expected = score_tokens(model, ids, targets), score_tokens(reference, ids, targets)
    torch.testing.assert_close(got.nll, expected.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.correct, expected.correct)
    full = gathered_state(model)
    assert full.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(full[name], tensor, rtol=0, atol=0, msg=name)
    return ids


@pytest.mark.parametrize("shape", SHAPES)
def test_tp2_forward_scoring_and_gathered_state_equal_one_process(shape):
    run_ranks(_forward_matches, 2, *SHAPES[shape])


def test_widths_tp_does_not_divide_are_refused_naming_the_block_and_the_padding_option():
    config, _ = SHAPES["padded_heads_ffn_vocab"]
    with pytest.raises(ParallelLayoutError, match=r"attention heads in block 0 \(3\).*padding"):
        check_shardable(config, 2, "teacher")


def test_key_value_heads_tp_neither_divides_nor_multiplies_are_refused_naming_the_padding():
    config = GPTConfig(
        family="llama", vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=12,
        n_kv_head=4, head_size=16, n_inner=96, dropout=0.0, qkv_bias=False, out_bias=False,
        mlp_bias=False,
    )  # fmt: skip
    # 2 query heads per rank would use 2 key/value heads, which 1 rank never holds.
    with pytest.raises(
        ParallelLayoutError,
        match=r"parallel.teacher_tensor_parallel_size=6 does not divide the teacher's key/value "
        r"heads in block 0 \(4\), nor is it a multiple of them.*padding: true .*\(4 -> 6 key/value",
    ):
        check_shardable(config, 6, "teacher", TEACHER_TP_SIZE_KEY)
    check_shardable(config, 4, "teacher")  # split: 3 query heads and their key/value head each
    check_shardable(replace(config, n_kv_head=2), 4, "teacher")  # replicated: a copy on 2 ranks


@pytest.mark.parametrize(
    ("kv_heads", "groups", "tp", "padded", "split"),
    [
        (25, 1, 4, 28, (7, 1)),  # GPT-2 XL: heads rounded up to a multiple of tp
        (2, 7, 4, 4, (1, 1)),  # Qwen2.5-0.5B's 14:2 at tp 4: whole zero groups, 28 query heads
        (8, 4, 16, 8, (1, 2)),  # Llama 3 8B's 32:8 at tp 16: each key/value head on 2 ranks
        (1, 3, 2, 2, (1, 1)),
        (1, 6, 4, 2, (1, 2)),
    ],
)
def test_padding_adds_whole_zero_key_value_groups_up_to_a_split(
    kv_heads, groups, tp, padded, split
):
    assert padded_kv_heads(kv_heads, groups, tp) == padded
    assert kv_split(padded, tp) == split


def test_padding_adds_zero_heads_and_neurons_after_the_real_ones():
    config, _ = SHAPES["padded_heads_ffn_vocab"]
    model = GPT(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pad_for_tensor_parallel(model, 2)
    qkv = model.blocks[1].attn.qkv_proj.weight.view(3, 2, 16, 48)  # [q; k; v] x 2 heads
    assert torch.equal(qkv[:, 0], before["blocks.1.attn.qkv_proj.weight"].view(3, 16, 48))
    assert not qkv[:, 1].any() and not model.blocks[1].attn.out_proj.weight[:, 16:].any()
    assert model.blocks[0].mlp.up_proj.weight.shape == (132, 48)
    assert not model.blocks[0].mlp.up_proj.bias[131:].any()
    assert not model.blocks[0].mlp.down_proj.weight[:, 131:].any()
    assert model.blocks[0].attn.qkv_proj.weight.shape == (3 * 4 * 16, 48)


# ------------------------------------------------------------------ the Llama family
FAMILY_SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=32,
)  # fmt: skip
# name -> (HF config class, its settings, pad). At tp 2, two key/value heads are split (one per
# rank), one is replicated (a copy on each rank).
FAMILY_CASES = {
    "llama-4q2kv-untied": (
        LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False), False,
    ),
    "llama-4q1kv-tied": (LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True), False),
    "mistral-4q1kv-untied": (
        MistralConfig, dict(num_key_value_heads=1, tie_word_embeddings=False), False,
    ),
    "qwen2-4q2kv-bias-tied": (
        Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True), False,
    ),
    "qwen2-4q1kv-bias-untied": (
        Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=False), False,
    ),
    "qwen3-4q2kv-qk_norm-tied": (
        Qwen3Config, dict(num_key_value_heads=2, tie_word_embeddings=True), False,
    ),
    "qwen3-4q1kv-qk_norm-bias-head_dim": (
        Qwen3Config,
        dict(num_key_value_heads=1, head_dim=32, attention_bias=True, tie_word_embeddings=False),
        False,
    ),
    # 3 query heads on 1 key/value head, 97 neurons: padded to 2 key/value groups (6 query
    # heads), 98 neurons. Width 48: HF wants the width a multiple of the heads.
    "llama-3q1kv-padded": (
        LlamaConfig,
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=97,
             tie_word_embeddings=False),
        True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    """Each case as a random HF folder, its norms and biases moved off their 1 and 0 inits."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    for name, (config_class, settings, _) in FAMILY_CASES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_class(**{**FAMILY_SHAPE, **settings}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(root / name)
    return {name: root / name for name in FAMILY_CASES}


def _families_match(folders: dict[str, Path]) -> None:
    from ted_scale.model import load_pretrained
    from ted_scale.parallel import init_parallel, teacher_dims

    shared, apart = init_parallel(2), teacher_dims(init_parallel(1), 2)
    for name, folder in folders.items():
        pad = FAMILY_CASES[name][2]
        try:
            _family_trains_as_one_process(load_pretrained(folder), shared, pad)
            if not pad:
                _assert_apart_taps_match(load_pretrained(folder), apart)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def _family_trains_as_one_process(reference: GPT, dims: ParallelDims, pad: bool) -> None:
    """Sharded over ``dims``: the forward, scores and gathered state of one process; and after an
    SGD step on the vocabulary-parallel cross-entropy, its weights and next forward (every
    key/value copy and the q/k norms trained on the whole model's gradient)."""
    from ted_scale.kernels import fused_linear_cross_entropy
    from ted_scale.parallel.tensor import gathered_state, parallelize_gpt

    model = copy.deepcopy(reference)
    parallelize_gpt(model, dims, "student", pad=pad)
    ids = _assert_sharded_forward_matches(model, reference)
    _assert_counts_match(model, reference, pad)
    for m in (model, reference):
        weight, shard = m.loss_head()
        hidden = m(ids, return_logits=False).last_hidden
        fused_linear_cross_entropy(hidden, weight, ids.roll(-1, 1), shard=shard).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= p.grad
    stepped = gathered_state(model)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(stepped[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    logits = _gather_logits(model(ids).logits, model.vocab_shard)
    torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def _assert_counts_match(model: GPT, reference: GPT, pad: bool) -> None:
    """The memory estimate's parameters per rank and the FLOP count of each block are what the
    sharded ``model`` holds and computes: its query heads and key/value heads (or copy) each."""
    from ted_scale.flops import forward_flops
    from ted_scale.parallel.memory_per_gpu import params_per_rank
    from ted_scale.parallel.tensor import qkv_rows_per_rank

    tp, whole = model.tensor_parallel.size, copy.deepcopy(reference)
    if pad:
        pad_for_tensor_parallel(whole, tp)
    assert sum(p.numel() for p in model.parameters()) == params_per_rank(whole, tp)
    for block, whole_block in zip(model.blocks, whole.blocks, strict=True):
        qkv = whole_block.attn.qkv_proj
        per_row = 2 * qkv.in_features
        split = forward_flops(whole_block, 16) - per_row * qkv.out_features
        expected = split / tp + per_row * qkv_rows_per_rank(whole_block.attn, tp)
        assert forward_flops(block, 16) == pytest.approx(expected, rel=1e-12)


def test_tp2_llama_family_forward_step_and_gathered_state_equal_one_process(family_folders):
    """Grouped-query attention whose key/value heads tp 2 splits (4:2) and replicates (4:1), tied
    and untied heads, Qwen2's q/k/v bias, Qwen3's q/k norms and head_dim, padding; each split
    apart too (a teacher over both ranks, the whole untied head beside it). One pair of ranks
    runs every case (starting ranks is what takes time)."""
    run_ranks(_families_match, 2, family_folders)


def _bench_at_tp2() -> None:
    import tempfile
    from pathlib import Path

    from ted_scale.bench.presets import PRESETS, Spec
    from ted_scale.bench.tensor_parallel import format_tp_table, run_tp_suite
    from ted_scale.bench.throughput import ProjectStep
    from ted_scale.parallel import init_parallel

    rows = run_tp_suite(PRESETS["micro"], ["ted"], 2, teacher_tp=True)
    dims = init_parallel(2)
    with tempfile.TemporaryDirectory() as run_dir:
        spec = Spec("ted", True, False, "auto")
        whole = ProjectStep(PRESETS["micro"], spec, dims.device, Path(run_dir))
        full = sum(p.numel() * p.element_size() for p in whole.module.parameters())
    if not dims.is_main:
        assert rows is None
        return
    shared, apart = rows
    assert shared["name"].endswith("/tp2") and apart["name"].endswith("/teacher-tp2")
    for row in rows:
        assert 0 < row["comm_ms"] < row["step_ms"] and 0 < row["comm_share"] < 1
        assert 0 < row["teacher_ms"] < row["step_ms"]
        assert row["optimizer_bytes_per_rank"] > 0
    # Shared: blocks split in two; embedding rows 128 -> 256 padded, 128 per rank; rest whole.
    assert shared["param_bytes_per_rank"] < full and shared["grad_sync_ms"] == 0
    # Apart: the student whole on each rank, its gradients averaged; the teacher split (with its
    # whole head beside the shards); two micro-batches per step.
    assert apart["trained_param_bytes_per_rank"] > shared["trained_param_bytes_per_rank"]
    assert apart["teacher_param_bytes_per_rank"] > shared["teacher_param_bytes_per_rank"]
    assert 0 < apart["grad_sync_ms"] <= apart["comm_ms"]
    assert apart["teacher_tp"] == 2 and apart["tp"] == 1
    assert apart["name"] in format_tp_table(rows)


def test_the_benchmark_at_tp2_times_its_communication_and_halves_the_split_weights():
    """Also with the teacher alone split (``--teacher-tp 2``): the student's gradient sync apart."""
    run_ranks(_bench_at_tp2, 2)


def _attention_dropout_per_rank() -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from ted_scale.parallel import init_parallel
    from ted_scale.parallel.tensor import parallelize_gpt

    dims = init_parallel(2)
    config = GPTConfig(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=4, dropout=0.3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def trained(checkpointing: bool) -> tuple[list[tuple[int, Tensor]], list[Tensor]]:
        """Every dropout mask (tensor rank, mask) of one step on the sharded model, and its
        gradients."""
        torch.manual_seed(0)
        model = GPT(config, attention="eager", activation_checkpointing=checkpointing).train()
        parallelize_gpt(model, dims, "student")
        masks, dropout = [], F.dropout

        def recording(x, p=0.5, training=True, inplace=False):
            y = dropout(x, p, training, inplace)
            masks.append((y.dim(), (y == 0) & (x != 0)))
            return y

        F.dropout = recording
        try:
            model(ids).logits.square().sum().backward()
        finally:
            F.dropout = dropout
        return masks, [p.grad for p in model.parameters()]

    masks, grads = trained(False)
    everyone = [None, None]
    dist.all_gather_object(everyone, masks, group=dims.tp_group)
    ours, theirs = everyone
    attention = [(a, b) for (n, a), (_, b) in zip(ours, theirs, strict=True) if n == 4]
    replicated = [(a, b) for (n, a), (_, b) in zip(ours, theirs, strict=True) if n != 4]
    assert len(attention) == 2 and len(replicated) == 5  # per block: heads; embeddings, 2 per block
    assert all(not torch.equal(a, b) for a, b in attention), "both ranks drew the same heads' mask"
    assert all(torch.equal(a, b) for a, b in replicated), "the replicated regions must agree"
    states = [None, None]
    dist.all_gather_object(states, torch.get_rng_state(), group=dims.tp_group)
    assert torch.equal(*states)  # the default streams stay in step
    # Activation checkpointing recomputes each block: the same key, the same masks, the same grads.
    recomputed_masks, recomputed = trained(True)
    first = recomputed_masks[: len(masks)]  # then the recomputation's own draws
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(masks, first, strict=True))
    for a, b in zip(grads, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tp_ranks_draw_their_own_attention_dropout_and_checkpointing_redraws_it():
    run_ranks(_attention_dropout_per_rank, 2)


def _qkv_relations_match() -> None:
    from ted_scale.distill.methods.cr_ild import MixupILD, MixupTapper
    from ted_scale.distill.objectives import LossSettings
    from ted_scale.parallel import init_parallel
    from ted_scale.parallel.tensor import parallelize_gpt

    dims = init_parallel(2)
    torch.manual_seed(0)
    shape = GPTConfig(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=4, dropout=0.0)
    teacher, student = GPT(shape).eval(), GPT(shape).train()
    for p in [*teacher.parameters(), *student.parameters()]:  # far from uniform relations
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 128, (3, 12))
    results = []
    for sharded in (False, True):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        if sharded:
            parallelize_gpt(t, dims, "teacher")
            parallelize_gpt(s, dims, "student")
        trained = MixupILD(
            s, torch.nn.Identity(), LossSettings(), layer=1, hidden=False, attention=False, qkv=True,
            consistency_weight=0.1, lm_loss=False,
        )  # fmt: skip
        tapper = MixupTapper(t, 1, hidden=False, attention=False, qkv=True, with_top=False)
        loss, parts = trained(ids, ids, tapper(ids, mix_lambda=0.7), 0.7, 0.5)
        loss.backward()
        results.append((loss, parts, s.blocks[1].ln_1.weight.grad, s.blocks[0].ln_2.weight.grad))
    (loss, parts, *grads), (tp_loss, tp_parts, *tp_grads) = results
    torch.testing.assert_close(tp_loss, loss, rtol=1e-5, atol=1e-6)
    assert tp_parts.keys() == parts.keys()
    for key in parts:
        torch.testing.assert_close(tp_parts[key], parts[key], rtol=1e-5, atol=1e-6)
    for got, want in zip(tp_grads, grads, strict=True):  # replicated: the whole gradient
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_cr_ild_qkv_relations_on_sharded_heads_equal_one_process():
    run_ranks(_qkv_relations_match, 2)


# ------------------------------------------------------------------ a teacher split apart
def _apart_taps_match_one_process() -> None:
    from ted_scale.parallel import init_parallel, teacher_dims

    apart = teacher_dims(init_parallel(1), 2)
    torch.manual_seed(0)  # 3 heads: one zero head padded in
    shape = GPTConfig(vocab_size=97, n_positions=16, n_embd=48, n_layer=3, n_head=3, dropout=0.0)
    _assert_apart_taps_match(GPT(shape), apart, pad=True)


def _assert_apart_taps_match(whole: GPT, apart: ParallelDims, *, pad: bool = False) -> None:
    """``whole`` split apart over both ranks (``apart``), each rank with its own micro-batch: the
    tapped states, top and whole head equal one process's on that micro-batch; so do CR-ILD's
    mixed states, attention and per-head relations, each rank's micro-batch mixed with its own
    lambda."""
    import torch.distributed as dist

    from ted_scale.distill.methods.cr_ild import MixupTapper
    from ted_scale.distill.modules import FrozenTapper
    from ted_scale.parallel.tensor import parallelize_gpt

    whole = whole.eval().requires_grad_(False)
    teacher = copy.deepcopy(whole)
    parallelize_gpt(teacher, apart, "teacher", pad=pad, gathers_batch=True)
    vocab, seq = whole.config.vocab_size, min(whole.config.n_positions, 16)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(apart.rank))
    layers = [0, whole.config.n_layer - 1]
    got = FrozenTapper(teacher, layers, with_top=True)(ids)
    want = FrozenTapper(whole, layers, with_top=True)(ids)
    got_states, want_states = (
        [*got.layer_states, got.last_hidden],
        [*want.layer_states, want.last_hidden],
    )
    for g, w in zip(got_states, want_states, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.head_weight, whole.lm_head_weight, rtol=0, atol=0)
    assert teacher.vocab_shard is not None and teacher.loss_head()[1] is None
    assert dist.get_world_size(apart.tp_group) == 2

    lambdas = (0.75, 0.6)  # by data rank
    objects = dict(hidden=True, attention=True, qkv=True, with_top=True)
    got = MixupTapper(teacher, 1, **objects)(ids, lambdas[apart.rank], slot_lambdas=lambdas)
    want = MixupTapper(whole, 1, **objects)(ids, lambdas[apart.rank])
    assert got.attention_log_probs.shape == (2, whole.config.layer_heads[1], seq, seq)
    for g, w in zip(
        [*got.layer_states, got.last_hidden, got.attention_log_probs, *got.relations],
        [*want.layer_states, want.last_hidden, want.attention_log_probs, *want.relations],
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_teacher_split_apart_taps_each_ranks_own_micro_batch_as_one_process():
    run_ranks(_apart_taps_match_one_process, 2)


def test_a_teacher_split_apart_needs_an_unsplit_student():
    from ted_scale.config import ConfigError
    from ted_scale.distill.methods import load_run_config

    sizes = ["parallel.tensor_parallel_size=2", "parallel.teacher_tensor_parallel_size=4"]
    with pytest.raises(ConfigError, match=r"teacher_tensor_parallel_size=4 with parallel\.tensor_"):
        load_run_config(None, sizes)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("ted_kl", "method=ted_kl does not support a teacher split apart"),
        ("lm", "method=lm: the method has no teacher"),
    ],
)
def test_methods_without_a_teacher_split_apart_are_refused_by_name(method, message, tmp_path):
    from ted_scale.config import ConfigError
    from ted_scale.distill.methods import load_run_config
    from ted_scale.train.trainer import Trainer

    config = load_run_config(
        None,
        [f"method={method}", "parallel.teacher_tensor_parallel_size=2", f"output_dir={tmp_path}"],
    )
    with pytest.raises(ConfigError, match=message):
        Trainer(config)
