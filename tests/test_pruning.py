from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ted_scale.model import GPT
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
