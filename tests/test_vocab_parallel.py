"""Vocabulary-parallel fused losses and scoring on two gloo CPU ranks against the unsharded ones.

One launch runs this file as a script on two ranks (`_worker`, Triton under TRITON_INTERPRET=1 on
CPU tensors): every rank builds the same inputs and holds its half of a head padded Megatron-style
(random padding rows 10x larger: they would dominate every softmax and argmax if they leaked in),
runs CE, mixed CE, KL, CE + KD, mixed CE + KD, the other KD divergences and mixed CE + JSD per
backend sharded over both ranks, and rank 0 the unsharded functions on the true vocabulary, rank 1
the sharded ones over a group of one (the whole padded head); the tests compare what the ranks
saved (tests/test_divergences.py checks the unsharded ones against the formulas).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ted_scale.kernels import (
    VocabShard,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kd,
    vocab_parallel_token_scores,
)
from ted_scale.parallel.dims import free_port

WORLD = 2
# (true vocabulary, padded to a multiple of 128 x WORLD): padding whose rank-1 shard spans two
# Triton blocks of 4096, none, and so much that rank 1 holds padding only.
VOCABS = {"padded": (9000, 9216), "unpadded": (512, 512), "padding_rank": (100, 256)}
SHAPE, D_STUDENT, D_TEACHER, CHUNK, T, KD_WEIGHT, MIX = (2, 3), 16, 24, 4, 2.0, 2.5, 0.7
TOL, BF16_TOL = 1e-5, 1e-2
# Forward KL (fused with CE) and the other divergences (`kernels.divergences`), alone and with CE.
LOSSES = ("ce", "ce_mix", "kl", "ce_kd", "ce_kd_mix", "reverse_kl", "jsd", "tvd", "ce_jsd_mix")
JSD_BETA = 0.3
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
]


def make_inputs(vocab: int, padded: int) -> dict[str, torch.Tensor]:
    """The same inputs on every rank; padding rows of both heads random and 10x larger."""
    g = torch.Generator().manual_seed(vocab)
    weight = torch.randn(padded, D_STUDENT, generator=g) * 0.5
    teacher_weight = torch.randn(padded, D_TEACHER, generator=g) * 0.5
    weight[vocab:] *= 10
    teacher_weight[vocab:] *= 10
    targets = torch.randint(0, vocab, SHAPE, generator=g)
    targets.view(-1)[::4] = -100
    targets2 = targets.flip(0).clone()
    targets2.view(-1)[1::5] = -100
    return {
        "hidden": torch.randn(*SHAPE, D_STUDENT, generator=g),
        "weight": weight,
        "targets": targets,
        "targets2": targets2,
        "teacher_hidden": torch.randn(*SHAPE, D_TEACHER, generator=g),
        "teacher_weight": teacher_weight,
    }


def scoring_inputs(x: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows [N, d] and targets [N]: the ignored ones replaced by the greedy prediction,
    so that some rows are predicted right."""
    hidden, targets = x["hidden"].view(-1, D_STUDENT), x["targets"].view(-1)
    greedy = (hidden @ x["weight"][:vocab].T).argmax(dim=1)
    return hidden, torch.where(targets != -100, targets, greedy)


def run_losses(x: dict, weight, teacher_weight, **kw) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each loss's returned values and (grad_hidden, grad_weight) for one head (full or shard)."""
    out = {}
    for name in LOSSES:
        hidden = x["hidden"].clone().requires_grad_()
        head = weight.clone().requires_grad_()
        mixed = {"targets2": x["targets2"], "mix": MIX} if name.endswith("_mix") else {}
        divergence = {"divergence": "jsd", "beta": JSD_BETA} if "jsd" in name else {}
        if name in ("reverse_kl", "tvd"):
            divergence = {"divergence": name}
        if name.startswith(("ce_kd", "ce_jsd")):
            values = fused_linear_ce_kd(
                hidden, head, x["targets"], x["teacher_hidden"], teacher_weight,
                temperature=T, kd_weight=KD_WEIGHT, **divergence, **mixed, **kw,
            )  # fmt: skip
        elif not name.startswith("ce"):
            mask = x["targets"] != -100
            values = (fused_linear_kd(hidden, head, x["teacher_hidden"], teacher_weight,
                                      temperature=T, mask=mask, **divergence, **kw),)  # fmt: skip
        else:
            values = (fused_linear_cross_entropy(hidden, head, x["targets"], **mixed, **kw),)
        values[0].backward()
        out[name] = (*(v.detach() for v in values), hidden.grad, head.grad)
    return out


def _rank_losses(rank: int, backend: str, case: str, single: dist.ProcessGroup) -> dict:
    """{variant: run_losses(...)} of one case on this rank; sharded grad_weight gathered."""
    vocab, padded = VOCABS[case]
    x = make_inputs(vocab, padded)
    rows = padded // WORLD
    part = slice(rank * rows, (rank + 1) * rows)
    kw = {"chunk_size": CHUNK, "backend": backend}
    shard = VocabShard(dist.group.WORLD, rank * rows, vocab)
    variants = {
        "sharded": run_losses(x, x["weight"][part], x["teacher_weight"][part], shard=shard, **kw)
    }
    # Rank 0 computes the expected values, rank 1 the group of one (the whole padded head).
    if rank == 0:
        variants["unsharded"] = run_losses(
            x, x["weight"][:vocab], x["teacher_weight"][:vocab], **kw
        )
    else:
        whole = VocabShard(single, 0, vocab)
        variants["single"] = run_losses(x, x["weight"], x["teacher_weight"], shard=whole, **kw)
    if case == "padded":  # bf16 logits: the op's fp32 copies written back into the shard
        x16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
        heads = x16["weight"], x16["teacher_weight"]
        variants["sharded_bf16"] = run_losses(x16, *(w[part] for w in heads), shard=shard, **kw)
        if rank == 0:
            variants["unsharded_bf16"] = run_losses(x16, *(w[:vocab] for w in heads), **kw)
    for sharded in (v for k, v in variants.items() if k.startswith("sharded")):
        for name, (*returned, grad_weight) in sharded.items():
            parts = [torch.empty_like(grad_weight) for _ in range(WORLD)]
            dist.all_gather(parts, grad_weight)
            sharded[name] = (*returned, torch.cat(parts))
    return variants


def _worker(rank: int, port: int, backends: list[str], out: Path) -> None:
    """One rank: saves {backend/case/variant/loss/i: tensor} and {case/scores/...}."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    saved = {}
    for case, (vocab, padded) in VOCABS.items():
        for backend in backends:
            for variant, losses in _rank_losses(rank, backend, case, singles[rank]).items():
                for name, values in losses.items():
                    prefix = f"{backend}/{case}/{variant}/{name}"
                    saved |= {f"{prefix}/{i}": v for i, v in enumerate(values)}
        x, rows = make_inputs(vocab, padded), padded // WORLD
        hidden, targets = scoring_inputs(x, vocab)
        shard = VocabShard(dist.group.WORLD, rank * rows, vocab)
        nll, correct = vocab_parallel_token_scores(
            hidden, x["weight"][rank * rows : (rank + 1) * rows], targets, shard, chunk_rows=CHUNK
        )
        saved |= {f"{case}/scores/nll": nll, f"{case}/scores/correct": correct}
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def all_ranks(tmp_path_factory, subprocess_env) -> list[dict[str, torch.Tensor]]:
    """What each of the two ranks saved (one launch for both backends: Triton interpreted)."""
    out, port = tmp_path_factory.mktemp("ranks"), free_port()
    backends = ",".join(["torch"] + (["triton"] if HAS_TRITON else []))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), backends, str(out)],
            env={**subprocess_env, "TRITON_INTERPRET": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(params=BACKENDS)
def ranks(request, all_ranks) -> list[dict[str, torch.Tensor]]:
    """Each rank's loss results for one backend, keyed case/variant/loss/i."""
    prefix = f"{request.param}/"
    return [{k.removeprefix(prefix): v for k, v in saved.items()} for saved in all_ranks]


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def values(saved: dict, case: str, variant: str, name: str) -> list[torch.Tensor]:
    prefix = f"{case}/{variant}/{name}/"
    return [saved[k] for k in sorted(k for k in saved if k.startswith(prefix))]


@pytest.mark.parametrize("case", VOCABS)
@pytest.mark.parametrize("name", LOSSES)
def test_sharded_losses_and_grads_match_unsharded(ranks, case, name):
    vocab, padded = VOCABS[case]
    expected = values(ranks[0], case, "unsharded", name)
    for saved, variant in [(ranks[0], "sharded"), (ranks[1], "sharded"), (ranks[1], "single")]:
        actual = values(saved, case, variant, name)
        *losses, grad_hidden, grad_weight = actual
        for loss, expected_loss in zip(losses, expected[:-2], strict=True):
            assert rel_diff(loss, expected_loss) <= TOL, (variant, loss, expected_loss)
        assert rel_diff(grad_hidden, expected[-2]) <= TOL, variant
        assert grad_weight.shape == (padded, D_STUDENT)
        assert rel_diff(grad_weight[:vocab], expected[-1]) <= TOL, variant
        assert not grad_weight[vocab:].any(), "padding rows got a gradient"


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_sharded_losses_and_grads_match_unsharded(ranks, name):
    vocab = VOCABS["padded"][0]
    expected = values(ranks[0], "padded", "unsharded_bf16", name)
    for saved in ranks:
        *losses, grad_hidden, grad_weight = values(saved, "padded", "sharded_bf16", name)
        assert all(loss.dtype == torch.float32 for loss in losses)
        assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
        for actual, wanted in zip([*losses, grad_hidden], expected[:-1], strict=True):
            assert rel_diff(actual, wanted) <= BF16_TOL
        assert rel_diff(grad_weight[:vocab], expected[-1]) <= BF16_TOL
        assert not grad_weight[vocab:].any(), "padding rows got a gradient"


@pytest.mark.parametrize("case", VOCABS)
def test_every_rank_returns_the_same_losses_and_hidden_grads(ranks, case):
    for name in LOSSES:
        rank0, rank1 = (values(saved, case, "sharded", name) for saved in ranks)
        for a, b in zip(rank0[:-1], rank1[:-1], strict=True):  # losses and grad_hidden
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", VOCABS)
def test_scores_match_full_head_scoring(all_ranks, case):
    # Imported here, not in the rank processes that run this file (it costs them 6 s).
    from ted_scale.eval.scoring import _rows_nll

    vocab, padded = VOCABS[case]
    x = make_inputs(vocab, padded)
    hidden, targets = scoring_inputs(x, vocab)
    expected_nll, expected_correct = _rows_nll(hidden @ x["weight"][:vocab].T, targets)
    assert expected_correct.any() and not expected_correct.all()
    for saved in all_ranks:
        nll, correct = saved[f"{case}/scores/nll"], saved[f"{case}/scores/correct"]
        assert nll.dtype == torch.float32 and correct.dtype == torch.bool
        assert rel_diff(nll, expected_nll) <= TOL
        assert torch.equal(correct, expected_correct)


def split_ops_agree(device: str, n: int, vocab: int, dtype: torch.dtype) -> None:
    """triton_ops' statistics and gradient passes equal torch_ops' on one shard's logits [n, V],
    for CE (two targets per row, some in another shard: -1), KD and both."""
    from ted_scale.kernels import torch_ops, triton_ops

    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, device=device, generator=g) * 3).to(dtype)
    teacher = (torch.randn(n, vocab, device=device, generator=g) * 3).to(dtype)
    targets = torch.randint(-1, vocab, (n, 2), device=device, generator=g)
    weights = torch.rand(n, 2, device=device, generator=g)
    kd_scale = torch.rand(n, device=device, generator=g)
    lse = torch.stack(  # as if this shard were the whole vocabulary
        [
            torch.logsumexp(z.float() / s, dim=1)
            for z, s in ((logits, 1), (logits, T), (teacher, T))
        ],
        dim=1,
    )
    tol = TOL if dtype == torch.float32 else BF16_TOL
    for ce, kd in ((True, False), (False, True), (True, True)):
        ce_args = (targets, weights) if ce else (None, None)
        stats = [
            ops.shard_stats(logits, *ce_args, teacher if kd else None, T)
            for ops in (triton_ops, torch_ops)
        ]
        assert stats[0].shape == stats[1].shape == (n, 3 * ce + 5 * kd)
        torch.testing.assert_close(stats[0], stats[1], rtol=TOL, atol=TOL)
        grads = []
        for ops in (triton_ops, torch_ops):
            grad, scratch = logits.clone(), teacher.clone() if kd else None
            ops.shard_grad_(grad, *ce_args, lse, scratch, kd_scale if kd else None, T)
            grads.append(grad)
        assert rel_diff(grads[0], grads[1]) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_split_ops_match_reference_on_cuda_at_a_gpt2_shard(dtype):
    split_ops_agree("cuda", 300, 50_304 // 2, dtype)  # GPT-2's padded vocabulary over TP = 2


def test_shard_descriptor_rejects_a_negative_start():
    with pytest.raises(ValueError, match="start"):
        VocabShard(None, -1, 100)


def test_heads_of_different_vocabulary_rows_are_refused_by_name():
    x = make_inputs(*VOCABS["unpadded"])
    with pytest.raises(
        ValueError, match="teacher_weight has 256 vocabulary rows, student_weight 512"
    ):
        fused_linear_kd(
            x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"][:256], temperature=T
        )


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), Path(sys.argv[4]))
