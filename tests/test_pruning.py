from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ted_scale.model import GPT, GPTConfig
from ted_scale.model.gpt import Subnet
from ted_scale.model.pruning import (
    Importance,
    extract,
    mask_importance,
    prune,
    reorder,
    subnet_at,
    subnet_masks,
)

SPARSITIES = [0.5, 0.7, 0.9]


@pytest.fixture
def model(tiny_config) -> GPT:
    """tiny_config's model with nonzero biases (so a pruned-away unit's bias would show)."""
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def calibration(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        w = torch.randint(0, 101, (2, 17), generator=g)
        labels = w[:, 1:].clone()
        labels[0, :3] = -100  # ignored positions count for nothing
        batches.append((w[:, :-1], labels))
    return batches


def loss_of(model, batch, **masks) -> torch.Tensor:
    ids, labels = batch
    logits = model(ids, **masks).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_importance_is_the_summed_absolute_mask_gradient_by_finite_differences(tiny_config):
    torch.manual_seed(0)
    config = replace(tiny_config, n_head_per_layer=[4, 2, 0, 3], n_inner_per_layer=[24, 5, 9, 0])
    model = GPT(config, attention="eager").double().eval()
    batches = calibration(2)
    importance = mask_importance(model, batches, fused=False)
    eps = 1e-5

    def fd(kind: str, layer: int, j: int) -> float:
        total = 0.0
        for batch in batches:
            sides = []
            for sign in (1, -1):
                heads = [torch.ones(h, dtype=torch.double) for h in config.layer_heads]
                neurons = [torch.ones(n, dtype=torch.double) for n in config.layer_inner]
                (heads if kind == "heads" else neurons)[layer][j] += sign * eps
                with torch.no_grad():
                    sides.append(loss_of(model, batch, head_mask=heads, neuron_mask=neurons))
            total += abs((sides[0] - sides[1]).item() / (2 * eps))
        return total

    for layer, h in enumerate(config.layer_heads):
        for j in range(h):
            assert importance.heads[layer][j].item() == pytest.approx(fd("heads", layer, j), 1e-5)
    for layer, n in enumerate(config.layer_inner):
        for j in range(0, n, 4):
            want = fd("neurons", layer, j)
            assert importance.neurons[layer][j].item() == pytest.approx(want, 1e-5)
    assert [len(v) for v in importance.heads] == [4, 2, 0, 3]
    # The parameters took no gradient.
    assert all(p.grad is None for p in model.parameters())


def test_fused_and_full_logits_losses_give_the_same_importance(model):
    batches = calibration(2)
    fused = mask_importance(model, batches, fused=True)
    full = mask_importance(model, batches, fused=False)
    for a, b in zip(fused.heads + fused.neurons, full.heads + full.neurons, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_normalisation_makes_each_blocks_scores_a_unit_vector(model):
    normed = mask_importance(model, calibration(1)).normalized()
    for v in normed.heads + normed.neurons:
        assert v.norm().item() == pytest.approx(1.0)


def test_a_reordered_model_computes_the_same_logits_with_units_sorted(model):
    importance = mask_importance(model, calibration(2))
    ids = torch.randint(0, 101, (2, 32))
    before = model(ids).logits
    qkv_before = model.blocks[0].attn.qkv_proj.weight.clone()
    ordered = reorder(model, importance)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    assert not torch.equal(model.blocks[0].attn.qkv_proj.weight, qkv_before)
    for v in ordered.heads + ordered.neurons:
        assert torch.all(v[:-1] >= v[1:])
    # A second reordering by the sorted scores changes nothing.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reorder(model, ordered)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_prune_at_zero_sparsity_equals_the_model(model):
    importance = mask_importance(model, calibration(1))
    pruned = prune(model, 0.0, importance)
    assert pruned.config.layer_heads == model.config.layer_heads
    assert pruned.config.layer_inner == model.config.layer_inner
    ids = torch.randint(0, 101, (2, 32))
    torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_every_candidate_is_a_prefix_of_the_reordered_model(model, sparsity):
    importance = mask_importance(model, calibration(2))
    pruned = prune(model, sparsity, importance)  # from the original order
    ordered = reorder(model, importance)
    subnet = subnet_at(ordered, sparsity)
    assert subnet == subnet_at(importance, sparsity)
    assert (pruned.config.layer_heads, pruned.config.layer_inner) == (subnet.heads, subnet.inner)
    ids = torch.randint(0, 101, (2, 32))
    expected = pruned(ids).logits
    heads, neurons = subnet_masks(model.config, subnet)
    for logits in (
        model(ids, subnet=subnet).logits,  # shared weights, prefix slices
        model(ids, head_mask=heads, neuron_mask=neurons).logits,  # shared weights, 0/1 masks
        extract(model, subnet)(ids).logits,  # a dense copy of the prefix
    ):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sparsity", [0.0, *SPARSITIES, 1.0])
def test_sparsity_is_the_fraction_of_heads_neurons_and_their_weights_removed(model, sparsity):
    importance = mask_importance(model, calibration(1))
    subnet = subnet_at(importance, sparsity)
    assert sum(subnet.heads) == 16 - round(sparsity * 16)
    assert sum(subnet.inner) == 4 * 192 - round(sparsity * 4 * 192)

    def prunable(m: GPT) -> int:  # the attention and FFN weight matrices
        return sum(p.numel() for n, p in m.named_parameters() if n.endswith("proj.weight"))

    removed = 1 - prunable(prune(model, sparsity, importance)) / prunable(model)
    assert removed == pytest.approx(sparsity, abs=0.01)


def test_the_ranking_is_global_over_blocks_after_per_block_normalisation():
    scores = Importance(
        heads=[torch.tensor([1.0, 1.0, 1.0, 0.1]), torch.tensor([0.05, 0.05, 0.05, 0.05])],
        neurons=[torch.ones(192), torch.ones(192)],
    )
    # Normalised, block 1's heads are 0.5 each and block 0's last is 0.058: that one goes first,
    # though block 1's raw scores are lower. Then block 1's four heads, then block 0's others.
    assert subnet_at(scores, 1 / 8).heads == (3, 4)
    assert subnet_at(scores, 5 / 8).heads == (3, 0)
    assert subnet_at(scores, 7 / 8).heads == (1, 0)


def test_a_subnet_forward_trains_the_shared_prefix_weights_like_the_dense_copy(model):
    importance = mask_importance(model, calibration(1))
    reorder(model, importance)
    subnet = subnet_at(importance, 0.7)
    dense = extract(model, subnet)
    batch = calibration(1, seed=5)[0]
    loss_of(model, batch, subnet=subnet).backward()
    loss_of(dense, batch).backward()
    layer = next(i for i, h in enumerate(subnet.heads) if 0 < h < 4)
    h, n, w = subnet.heads[layer], subnet.inner[layer], 12 * subnet.heads[layer]
    shared, copy = model.blocks[layer], dense.blocks[layer]
    qkv = shared.attn.qkv_proj.weight.grad.view(3, 48, 48)
    torch.testing.assert_close(qkv[:, :w].reshape(-1, 48), copy.attn.qkv_proj.weight.grad)
    assert not qkv[:, w:].any()  # heads outside the candidate get no gradient
    torch.testing.assert_close(
        shared.attn.out_proj.weight.grad[:, :w], copy.attn.out_proj.weight.grad
    )
    torch.testing.assert_close(shared.mlp.up_proj.weight.grad[:n], copy.mlp.up_proj.weight.grad)
    assert not shared.mlp.down_proj.weight.grad[:, n:].any()
    assert h < 4 and n < 192


def test_bad_subnets_masks_and_sparsities_are_rejected(model):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"subnet heads\[2\] = 5 outside 0..4"):
        model(ids, subnet=Subnet((4, 4, 5, 4), (192,) * 4))
    with pytest.raises(ValueError, match=r"head_mask\[1\] has shape \(3,\), expected \(4,\)"):
        model(ids, head_mask=[torch.ones(4), torch.ones(3), torch.ones(4), torch.ones(4)])
    importance = mask_importance(model, calibration(1))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        prune(model, 1.5, importance)
    with pytest.raises(ValueError, match="importance covers heads"):
        reorder(model, Importance(importance.heads[:2], importance.neurons[:2]))


# ---------------------------------------------------------------------------- the Llama family
# Grouped-query attention 4:2 (two units of two query heads per block), SwiGLU, an untied head;
# Qwen2's q/k/v bias and Qwen3's q/k norm and head width (16, not 48 / 4) ride along.
FAMILY_CASES = {
    "llama": dict(family="llama", qkv_bias=False, out_bias=False, mlp_bias=False),
    "qwen2-bias": dict(family="qwen2", out_bias=False, mlp_bias=False),
    "qwen3-norm": dict(family="qwen3", qkv_bias=True, out_bias=True, mlp_bias=False, qk_norm=True,
                       head_size=16),
}  # fmt: skip


def family_model(case: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=101, n_positions=64, n_embd=48, n_layer=4, n_head=4, n_kv_head=2, n_inner=64,
        dropout=0.0, tie_word_embeddings=False, **FAMILY_CASES[case],
    )  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_a_units_importance_is_the_mask_gradient_its_query_heads_share():
    """A unit is a key/value group: its two query heads take one mask, so its score is the
    absolute value of the sum of their per-head mask gradients (not the sum of their absolute
    values), summed over batches; SwiGLU neurons keep one mask each."""
    model = family_model("qwen3-norm")
    batches = calibration(2)
    importance = mask_importance(model, batches, fused=False)
    assert importance.group_size == 2 and [len(v) for v in importance.heads] == [2] * 4
    units, neurons = torch.zeros(4, 2), torch.zeros(4, 64)
    for batch in batches:
        heads = [torch.ones(4, requires_grad=True) for _ in range(4)]
        ffn = [torch.ones(64, requires_grad=True) for _ in range(4)]
        loss = loss_of(model, batch, head_mask=heads, neuron_mask=ffn)
        grads = torch.autograd.grad(loss, heads + ffn)
        units += torch.stack(grads[:4]).view(4, 2, 2).sum(-1).abs()
        neurons += torch.stack(grads[4:]).abs()
    torch.testing.assert_close(torch.stack(importance.heads), units)
    torch.testing.assert_close(torch.stack(importance.neurons), neurons)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_a_pruned_family_model_equals_the_masked_and_the_prefix_of_the_reordered_one(case):
    model = family_model(case)
    importance = mask_importance(model, calibration(2))
    ids = torch.randint(0, 101, (2, 32))
    before = model(ids).logits
    pruned = {s: prune(model, s, importance) for s in SPARSITIES}  # from the original order
    ordered = reorder(model, importance)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    for s, dense in pruned.items():
        subnet = subnet_at(ordered, s)
        assert all(h % 2 == 0 for h in subnet.heads)  # whole key/value groups
        assert (dense.config.layer_heads, dense.config.layer_inner) == (subnet.heads, subnet.inner)
        heads, neurons = subnet_masks(model.config, subnet)
        expected = dense(ids).logits
        for logits in (
            model(ids, subnet=subnet).logits,
            model(ids, head_mask=heads, neuron_mask=neurons).logits,
            extract(model, subnet)(ids).logits,
        ):
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_pruning_keeps_each_swiglu_neuron_and_each_key_value_group_whole():
    """Every kept neuron of the pruned model is one neuron of the original across its gate and
    up rows and down column; every kept key/value head comes with its own group's query heads,
    value head, output columns and biases."""
    model = family_model("qwen2-bias")
    pruned = prune(model, 0.5, mask_importance(model, calibration(2)))
    d = model.config.head_dim

    def unit(t: torch.Tensor, i: int, width: int) -> torch.Tensor:
        return t[..., i * width : (i + 1) * width]

    for block, small in zip(model.blocks, pruned.blocks, strict=True):
        gate, up, down = (getattr(block.mlp, f"{p}_proj").weight for p in ("gate", "up", "down"))
        for j, row in enumerate(small.mlp.gate_proj.weight):
            (i,) = [i for i in range(64) if torch.equal(gate[i], row)]
            assert torch.equal(up[i], small.mlp.up_proj.weight[j])
            assert torch.equal(down[:, i], small.mlp.down_proj.weight[:, j])
        kept = small.attn.n_head // 2  # key/value groups of two query heads
        # Rows of q, k, v as the last dimension: [C + 1, rows], the bias the last column.
        full, cut = (
            torch.cat([a.qkv_proj.weight, a.qkv_proj.bias[:, None]], dim=1).T
            for a in (block.attn, small.attn)
        )
        q, k, v = full.split([4 * d, 2 * d, 2 * d], dim=1)
        sq, sk, sv = cut.split([2 * kept * d, kept * d, kept * d], dim=1)
        for u in range(kept):
            (i,) = [i for i in range(2) if torch.equal(unit(k, i, d), unit(sk, u, d))]
            assert torch.equal(unit(v, i, d), unit(sv, u, d))
            assert torch.equal(unit(q, i, 2 * d), unit(sq, u, 2 * d))
            assert torch.equal(
                unit(block.attn.out_proj.weight, i, 2 * d),
                unit(small.attn.out_proj.weight, u, 2 * d),
            )
    assert pruned.config.layer_heads != model.config.layer_heads
    with pytest.raises(ValueError, match=r"subnet heads\[0\] = 3 is not a whole number of key/"):
        extract(model, Subnet((3, 4, 4, 4), (64,) * 4))
    with pytest.raises(
        ValueError, match=r"importance scores units of 1 query heads, but the model"
    ):
        reorder(model, Importance([torch.ones(4)] * 4, [torch.ones(64)] * 4))
