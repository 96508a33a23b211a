"""CR-ILD (docs/design.md, "CR-ILD"): every loss term against a direct formula written here,
gradients and the stop-gradient branch included; the mixup draw shared by teacher and student
through the prefetch path; exact resume after kill -9; the lambda = 1 cross-check against LWD."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from ted_scale.config import ConfigError
from ted_scale.distill.methods import MethodContext, get_method, load_run_config
from ted_scale.distill.methods.cr_ild import MixupDraw, MixupILD, MixupTapper
from ted_scale.distill.objectives import LossSettings
from ted_scale.flops import FROZEN, TRAINED, forward_flops
from ted_scale.model import GPT, GPTConfig, ModelMismatchError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cr-ild.yaml"
LAMBDA, RAMP, W_IC, ALPHA_KD, ALPHA_LAYER, T = 0.7, 0.4, 0.1, 2.5, 0.1, 2.0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- direct formulas
def _model(n_embd: int, n_layer: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    shape = GPTConfig(101, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=4, dropout=0.0)
    model = GPT(shape)
    for p in model.parameters():  # far from uniform attention and tiny states
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def direct_forward(
    model: GPT, ids: Tensor, lam: float, layer: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden after block ``layer`` [B, T, d], its attention probabilities [B, H, T, T], the
    final-normed top [B, T, d]) on x_mix = lam (wte(x) + wpe) + (1 - lam) (wte(x_rev) + wpe),
    written out with an explicit softmax in every block."""
    B, L = ids.shape
    pos = model.wpe.weight[:L]
    x = lam * (model.wte.weight[ids] + pos) + (1 - lam) * (model.wte.weight[ids.flip(0)] + pos)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i, block in enumerate(model.blocks):
        C, H = x.shape[-1], block.attn.n_head
        q, k, v = block.attn.qkv_proj(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, L, H, C // H).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + block.attn.out_proj((probs @ v).transpose(1, 2).reshape(B, L, C))
        x = x + block.mlp.down_proj(F.gelu(block.mlp.up_proj(block.ln_2(x)), approximate="tanh"))
        if i == layer:
            hidden, attention = x, probs
    return hidden, attention, model.ln_f(x)


def direct_kl(target: Tensor, student: Tensor) -> Tensor:
    """sum over causal keys of p_t log(p_t / p_s), mean over batch, heads and queries."""
    causal = torch.ones(target.shape[-1], target.shape[-1], dtype=torch.bool).tril()
    target, student = (torch.where(causal, p, torch.ones(())) for p in (target, student))
    return torch.where(causal, target * (target.log() - student.log()), 0.0).sum(-1).mean()


def direct_kd(z_s: Tensor, z_t: Tensor, keep: Tensor) -> Tensor:
    log_p_s, log_p_t = F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return rows[keep].mean() * T**2


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 101, (3, 16), generator=g)
    labels = torch.randint(0, 101, (3, 16), generator=g)
    labels[0, :5] = -100
    return ids, labels


def _sides(*, lm_loss: bool) -> tuple[GPT, GPT, MixupILD, MixupTapper]:
    teacher, student = _model(48, 4, 0), _model(32, 2, 1).train()
    fit = torch.nn.Linear(32, 48)
    trained = MixupILD(
        student, fit, LossSettings(), layer=1, hidden=True, attention=True,
        consistency_weight=W_IC, lm_loss=lm_loss, alpha_kd=ALPHA_KD if lm_loss else 0.0,
        alpha_layer=ALPHA_LAYER if lm_loss else 1.0, temperature=T,
    )  # fmt: skip
    tapper = MixupTapper(teacher, 3, hidden=True, attention=True, with_top=lm_loss)
    return teacher, student, trained, tapper


def _grads(loss: Tensor, module: torch.nn.Module) -> list[Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def _close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_every_joint_term_and_the_gradient_equal_the_direct_formulas():
    teacher, student, trained, tapper = _sides(lm_loss=True)
    ids, labels = _batch()
    loss, parts = trained(ids, labels, tapper(ids, mix_lambda=LAMBDA), LAMBDA, RAMP)

    h_t, a_t, top_t = (t.detach() for t in direct_forward(teacher, ids, LAMBDA, 3))
    h_s, a_s, top_s = direct_forward(student, ids, LAMBDA, 1)
    with torch.no_grad():
        h_clean, a_clean, _ = direct_forward(student, ids, 1.0, 1)
    z_s, z_t = top_s @ student.wte.weight.T, top_t @ teacher.wte.weight.T
    flat = z_s.flatten(0, 1)
    expected = {
        "loss_ce": LAMBDA * F.cross_entropy(flat, labels.flatten())
        + (1 - LAMBDA) * F.cross_entropy(flat, labels.flip(0).flatten()),
        "loss_kd": direct_kd(z_s, z_t, labels != -100),
        "loss_hidden": (trained.fit(h_s) - h_t).square().mean(),
        "loss_attention": direct_kl(a_t, a_s),
        "loss_consistency_hidden": LAMBDA * (h_s - h_clean).square().mean()
        + (1 - LAMBDA) * (h_s - h_clean.flip(0)).square().mean(),
        "loss_consistency_attention": LAMBDA * direct_kl(a_clean, a_s)
        + (1 - LAMBDA) * direct_kl(a_clean.flip(0), a_s),
    }
    expected["loss_layer"] = expected["loss_hidden"] + expected["loss_attention"]
    expected["loss_consistency"] = (
        W_IC * RAMP * (expected["loss_consistency_hidden"] + expected["loss_consistency_attention"])
    )
    total = (
        expected["loss_ce"]
        + ALPHA_KD * expected["loss_kd"]
        + ALPHA_LAYER * (expected["loss_layer"] + expected["loss_consistency"])
    )
    assert parts.keys() == expected.keys()
    assert all(v > 1e-4 for v in expected.values())  # every term is really there
    for key, value in expected.items():
        _close(parts[key], value.detach())
    _close(loss, total)
    for got, want in zip(_grads(loss, trained), _grads(total, trained), strict=True):
        _close(got, want)


def test_the_consistency_targets_are_stop_gradient_branches():
    teacher, student, trained, tapper = _sides(lm_loss=False)
    ids, labels = _batch()
    loss, _ = trained(ids, labels, tapper(ids, mix_lambda=LAMBDA), LAMBDA, RAMP)
    clean_calls = []
    student.register_forward_hook(lambda *_: clean_calls.append(torch.is_grad_enabled()))
    trained(ids, labels, tapper(ids, mix_lambda=LAMBDA), LAMBDA, RAMP)
    assert clean_calls == [True, False]  # the mixed pass, then the clean pass without autograd

    def consistency(detach: bool) -> Tensor:
        h_s, a_s, _ = direct_forward(student, ids, LAMBDA, 1)
        h_c, a_c, _ = direct_forward(student, ids, 1.0, 1)
        if detach:
            h_c, a_c = h_c.detach(), a_c.detach()
        hidden = (
            LAMBDA * (h_s - h_c).square().mean()
            + (1 - LAMBDA) * (h_s - h_c.flip(0)).square().mean()
        )
        attention = LAMBDA * direct_kl(a_c, a_s) + (1 - LAMBDA) * direct_kl(a_c.flip(0), a_s)
        return W_IC * RAMP * (hidden + attention)

    h_t, a_t, _ = (t.detach() for t in direct_forward(teacher, ids, LAMBDA, 3))
    h_s, a_s, _ = direct_forward(student, ids, LAMBDA, 1)
    ild = (trained.fit(h_s) - h_t).square().mean() + direct_kl(a_t, a_s)
    for got, want in zip(
        _grads(loss, trained), _grads(ild + consistency(True), trained), strict=True
    ):
        _close(got, want)
    stopped, through = _grads(consistency(True), trained), _grads(consistency(False), trained)
    assert any(
        not torch.allclose(s, t, rtol=1e-3, atol=1e-6)
        for s, t in zip(stopped, through, strict=True)
    ), "a gradient through the clean pass would have changed the student's gradient"


def direct_relations(model: GPT, ids: Tensor, lam: float, layer: int) -> list[Tensor]:
    """The Q-Q, K-K, V-V relation probabilities [B, H, T, T] of block ``layer`` on x_mix:
    softmax over the causal keys of X X^T / sqrt(d_head), X the block's per-head Q, K or V."""
    B, L = ids.shape
    if layer == 0:
        pos = model.wpe.weight[:L]
        x = lam * (model.wte.weight[ids] + pos) + (1 - lam) * (model.wte.weight[ids.flip(0)] + pos)
    else:
        x = direct_forward(model, ids, lam, layer - 1)[0]
    block = model.blocks[layer]
    C, H = x.shape[-1], block.attn.n_head
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    out = []
    for t in block.attn.qkv_proj(block.ln_1(x)).split(C, dim=2):
        t = t.view(B, L, H, C // H).transpose(1, 2)
        scores = (t @ t.transpose(-2, -1)) / math.sqrt(C // H)
        out.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    return out


@pytest.mark.parametrize("layer", [0, 1])
def test_qkv_relations_and_their_consistency_equal_the_direct_formulas(layer):
    teacher, student = _model(48, 4, 0), _model(32, 2, 1).train()
    trained = MixupILD(
        student, torch.nn.Identity(), LossSettings(), layer=layer, hidden=False, attention=False, qkv=True,
        consistency_weight=W_IC, lm_loss=False,
    )  # fmt: skip
    tapper = MixupTapper(teacher, 3, hidden=False, attention=False, qkv=True, with_top=False)
    ids, labels = _batch()
    loss, parts = trained(ids, labels, tapper(ids, mix_lambda=LAMBDA), LAMBDA, RAMP)

    r_t = [r.detach() for r in direct_relations(teacher, ids, LAMBDA, 3)]
    r_s = direct_relations(student, ids, LAMBDA, layer)
    with torch.no_grad():
        r_c = direct_relations(student, ids, 1.0, layer)
    ild = sum(direct_kl(t, s) for t, s in zip(r_t, r_s, strict=True))
    consistency = sum(
        LAMBDA * direct_kl(c, s) + (1 - LAMBDA) * direct_kl(c.flip(0), s)
        for c, s in zip(r_c, r_s, strict=True)
    )
    expected = {
        "loss_qkv": ild,
        "loss_layer": ild,
        "loss_consistency_qkv": consistency,
        "loss_consistency": W_IC * RAMP * consistency,
    }
    assert parts.keys() == expected.keys()
    assert all(v > 1e-4 for v in expected.values())
    for key, value in expected.items():
        _close(parts[key], value.detach())
    total = ild + W_IC * RAMP * consistency
    _close(loss, total)
    grads = _grads(loss, trained)
    for got, want in zip(grads, _grads(total, trained), strict=True):
        _close(got, want)
    # The relations read block k's input: block k itself gets gradient only through its
    # ln_1 and qkv_proj, and the blocks before it through that input.
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    named = dict(zip(names, grads, strict=True))
    assert named[f"student.blocks.{layer}.attn.qkv_proj.weight"].abs().sum() > 0
    assert named[f"student.blocks.{layer}.mlp.up_proj.weight"].abs().sum() == 0


def test_the_authors_objects_build_no_fit_and_count_the_relations(tmp_path):
    method = get_method("cr_ild")
    ctx = _ctx(tmp_path, "cr_ild.consistency_weight=0")  # the default objects: qkv
    qkv = method.build("ild", ctx)
    assert isinstance(qkv.trained.fit, torch.nn.Identity)  # relations are T x T: no fit
    assert not any(p.requires_grad for p in qkv.trained.fit.parameters())
    assert (qkv.trained.last, qkv.tapper.last) == (0, 2)  # they read blocks k and m's inputs
    T, d = 16, 64
    relations = forward_flops(ctx.student.blocks[1].attn.qkv_proj, T) + 3 * 2 * T * d
    want = FROZEN * (forward_flops(ctx.teacher.blocks[:3], T) + relations)
    want += TRAINED * (forward_flops(ctx.student.blocks[:1], T) + relations)
    assert qkv.flops_per_token(T) == want
    with pytest.raises(ConfigError, match=r"cr_ild\.objects must be one of .*got 'qk'"):
        load_run_config(CONFIG, ["cr_ild.objects=qk"])
    with pytest.raises(ConfigError, match=r"cr_ild\.stage2_loss must be one of .*got 'ce'"):
        load_run_config(CONFIG, ["cr_ild.stage2_loss=ce"])
    assert load_run_config(REPO / "configs" / "gpt2-cr-ild-owt.yaml").cr_ild.objects == "qkv"


def test_stage2_as_the_authors_ran_it_is_t2_scaled_kd_alone(tmp_path):
    ctx = _ctx(tmp_path, "cr_ild.stage2_loss=kd")
    method = get_method("cr_ild")
    method.build("ild", ctx).finish()
    phase = method.build("stage2", ctx)
    ids, labels = _batch()
    loss, parts = phase.trained(ids, labels, phase.tapper(ids))
    student = phase.trained.student
    z_s = student.lm_head(student(ids, return_logits=False).last_hidden)
    kd = direct_kd(z_s, ctx.teacher(ids).logits, labels != -100)
    assert parts.keys() == {"loss_kd"}
    _close(loss, kd)
    for got, want in zip(_grads(loss, student), _grads(kd, student), strict=True):
        _close(got, want)


def _ctx(tmp_path: Path, *overrides: str, models: tuple[GPT, GPT] | None = None) -> MethodContext:
    """A context on the tiny config, with GPT-2 models of width 64 unless ``models`` (teacher,
    student) are given."""
    config = load_run_config(CONFIG, [f"output_dir={tmp_path}", *overrides])
    teacher, student = models or (_model(64, 4, 0), _model(64, 2, 1))
    student.train()
    return MethodContext(
        config=config, teacher=teacher, student=student, layer_map=[0, 3],
        device=torch.device("cpu"), compute_dtype=None, run_dir=tmp_path, log=lambda _: None,
    )  # fmt: skip


def test_stage2_is_ce_plus_t2_scaled_kd_from_the_saved_ild_student(tmp_path):
    ctx = _ctx(tmp_path)
    method = get_method("cr_ild")
    assert [(p.name, p.kind) for p in method.plan(ctx.config)] == [
        ("ild", "filters"),
        ("stage2", "distill"),
    ]
    with pytest.raises(FileNotFoundError, match="run the ild phase first"):
        method.build("stage2", ctx)
    method.build("ild", ctx).finish()
    phase = method.build("stage2", ctx)
    ids, labels = _batch()
    loss, parts = phase.trained(ids, labels, phase.tapper(ids))
    student = phase.trained.student
    z_s = student.lm_head(student(ids, return_logits=False).last_hidden)
    z_t = ctx.teacher(ids).logits
    ce = F.cross_entropy(z_s.flatten(0, 1), labels.flatten())
    kd = direct_kd(z_s, z_t, labels != -100)
    _close(parts["loss_ce"], ce.detach())
    _close(parts["loss_kd"], kd.detach())
    _close(loss, ce + ALPHA_KD * kd)
    assert torch.equal(student.wte.weight, ctx.student.wte.weight)


def test_flops_count_the_clean_input_pass_and_bad_settings_are_refused(tmp_path):
    method = get_method("cr_ild")
    with_c = method.build("ild", _ctx(tmp_path, "cr_ild.objects=both")).flops_per_token(16)
    ctx = _ctx(tmp_path, "cr_ild.objects=both", "cr_ild.consistency_weight=0")
    without = method.build("ild", ctx).flops_per_token(16)
    assert with_c - without == FROZEN * forward_flops(ctx.student.blocks[:2], 16)
    with pytest.raises(ModelMismatchError, match=r"cr_ild.student_layer=2: the student has blocks"):
        method.build("ild", _ctx(tmp_path, "cr_ild.student_layer=2"))
    with pytest.raises(ConfigError, match=r"cr_ild\.objects"):
        load_run_config(CONFIG, ["cr_ild.objects=logits"])


def test_mixup_draw_is_the_same_over_any_layout_of_ranks_and_resumes_exactly():
    def lambdas(rank: int, ranks: int, n: int, draw: MixupDraw | None = None) -> list[float]:
        draw = draw or MixupDraw(
            1.0, seed=5, rank=rank, ranks=ranks, micro_batches_per_step=4 // ranks, ramp="linear"
        )
        draw.start(10)
        return [draw(torch.zeros(2, 3))["mix_lambda"] for _ in range(n)]

    single = lambdas(0, 1, 10)
    assert all(0.5 <= x < 1.0 for x in single) and len(set(single)) == 10
    assert lambdas(0, 2, 5) == single[0::2] and lambdas(1, 2, 5) == single[1::2]
    draw = MixupDraw(1.0, seed=5, rank=0, ranks=1, micro_batches_per_step=4, ramp="linear")
    lambdas(0, 1, 3, draw)
    resumed = MixupDraw(1.0, seed=5, rank=0, ranks=1, micro_batches_per_step=4, ramp="linear")
    resumed.load_state_dict(draw.state_dict())
    assert lambdas(0, 1, 7, resumed) == single[3:]
    ramps = [draw(torch.zeros(2, 3))["ramp"] for _ in range(5)]
    assert ramps == [0.0, 0.1, 0.1, 0.1, 0.1]  # batches 3..7 of 4 per step over 10 steps
    on_two = MixupDraw(1.0, seed=5, rank=1, ranks=2, micro_batches_per_step=2, ramp="linear")
    on_two.load_state_dict(draw.state_dict())  # 8 slots drawn by one rank: 2 steps of 4
    on_two.start(10)
    # Every rank's lambda of the slot too: a teacher split apart mixes its group's micro-batches.
    slot = {"mix_lambda": single[9], "ramp": 0.2, "slot_lambdas": (single[8], single[9])}
    assert on_two(torch.zeros(2, 3)) == slot
    degenerate = MixupDraw(0.0, seed=5, rank=0, ranks=1, micro_batches_per_step=1, ramp="none")
    assert {degenerate(torch.zeros(2, 3))["mix_lambda"] for _ in range(5)} == {1.0}


# ---------------------------------------------------------------------------- the Llama family
# Grouped-query attention 4:2, RoPE, untied heads; Qwen3 adds q/k norm and a head width (16) other
# than n_embd / n_head.
FAMILY = {
    "llama": dict(qkv_bias=False, out_bias=False, mlp_bias=False),
    "qwen3": dict(qkv_bias=True, out_bias=True, mlp_bias=False, qk_norm=True, head_size=16),
}


def _family_model(family: str, n_embd: int, n_layer: int, seed: int, n_kv_head: int = 2) -> GPT:
    torch.manual_seed(seed)
    shape = GPTConfig(
        101, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head,
        n_inner=2 * n_embd, dropout=0.0, family=family, tie_word_embeddings=False,
        **FAMILY[family],
    )  # fmt: skip
    model = GPT(shape)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def direct_family_relations(model: GPT, ids: Tensor, lam: float, layer: int) -> list[Tensor]:
    """The Q-Q, K-K, V-V relation probabilities of block ``layer`` on x_mix = lam wte(x) +
    (1 - lam) wte(x_rev) (no position added: positions rotate q and k), written out: q and k
    RMS-normed per head (Qwen3), then rotated by position (rotate-half, theta 10^4); Q per query
    head [B, 4, T, T], K and V per key/value head [B, 2, T, T]."""
    B, L = ids.shape
    x = lam * model.wte.weight[ids] + (1 - lam) * model.wte.weight[ids.flip(0)]
    for block in model.blocks[:layer]:
        x = block(x)
    block = model.blocks[layer]
    attn = block.attn
    d, h = attn.head_dim, attn.n_head
    q, k, v = attn.qkv_proj(block.ln_1(x)).split([h * d, h // 2 * d, h // 2 * d], dim=2)
    q, k, v = (t.view(B, L, -1, d) for t in (q, k, v))
    if attn.q_norm is not None:
        q, k = ((t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5)) for t in (q, k))
        q, k = q * attn.q_norm.weight, k * attn.k_norm.weight
    angles = torch.arange(L)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [T, 1, d]: per position, all heads

    def rotate(t: Tensor) -> Tensor:
        first, second = t.chunk(2, dim=-1)
        return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    out = []
    for t in (rotate(q), rotate(k), v):
        t = t.transpose(1, 2)
        scores = (t @ t.transpose(-2, -1)) / math.sqrt(d)
        out.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    return out


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("family", FAMILY)
def test_family_relations_are_of_the_normed_rotated_q_and_k_and_per_key_value_head(family, layer):
    """Teacher (width 48, 3 blocks) and student (width 32, 2 blocks) pair their 4 query heads and
    2 key/value heads; the loss, the consistency and the gradients equal the direct formulas, and
    the K and V terms equal their per-query-head means after repetition (the same mean)."""
    teacher = _family_model(family, 48, 3, 0)
    student = _family_model(family, 32, 2, 1).train()
    trained = MixupILD(
        student, torch.nn.Identity(), LossSettings(), layer=layer, hidden=False, attention=False,
        qkv=True, consistency_weight=W_IC, lm_loss=False,
    )  # fmt: skip
    tapper = MixupTapper(teacher, 2, hidden=False, attention=False, qkv=True, with_top=False)
    ids, labels = _batch()
    tapped = tapper(ids, mix_lambda=LAMBDA)
    assert [r.shape[1] for r in tapped.relations] == [4, 2, 2]
    loss, parts = trained(ids, labels, tapped, LAMBDA, RAMP)

    r_t = direct_family_relations(teacher, ids, LAMBDA, 2)
    for got, want in zip(tapped.relations, r_t, strict=True):
        _close(got.exp(), want)
    r_s = direct_family_relations(student, ids, LAMBDA, layer)
    with torch.no_grad():
        r_c = direct_family_relations(student, ids, 1.0, layer)
    ild = sum(direct_kl(t, s) for t, s in zip(r_t, r_s, strict=True))
    repeats = (1, 2, 2)  # each key/value head serves two query heads
    per_query_head = sum(
        direct_kl(t.repeat_interleave(n, 1), s.repeat_interleave(n, 1))
        for t, s, n in zip(r_t, r_s, repeats, strict=True)
    )
    _close(per_query_head, ild)
    consistency = sum(
        LAMBDA * direct_kl(c, s) + (1 - LAMBDA) * direct_kl(c.flip(0), s)
        for c, s in zip(r_c, r_s, strict=True)
    )
    _close(parts["loss_qkv"], ild.detach())
    _close(parts["loss_consistency_qkv"], consistency.detach())
    total = ild + W_IC * RAMP * consistency
    _close(loss, total)
    for got, want in zip(_grads(loss, trained), _grads(total, trained), strict=True):
        _close(got, want)


def test_family_heads_that_do_not_pair_are_refused_by_name_and_relations_count_gqa(tmp_path):
    method = get_method("cr_ild")
    teacher = _family_model("llama", 64, 4, 0)
    mha = _family_model("llama", 64, 2, 1, n_kv_head=4)
    with pytest.raises(
        ModelMismatchError,
        match=r"cr_ild.objects=qkv compares per-head distributions head by head: the student's "
        r"block 1 has 4 key/value heads, the teacher's block 3 2",
    ):
        method.build("ild", _ctx(tmp_path, models=(teacher, mha)))
    # Attention distributions are per query head: 4 and 4 pair.
    ctx = _ctx(tmp_path, "cr_ild.objects=attention", models=(teacher, mha))
    phase = method.build("ild", ctx)
    ids, labels = _batch()
    loss, _ = phase.trained(ids, labels, phase.tapper(ids, mix_lambda=LAMBDA), LAMBDA, RAMP)
    assert torch.isfinite(loss)
    # The relations' FLOPs: qkv_proj again, and X X^T for 4 query and 2 + 2 key/value heads.
    gqa = _family_model("llama", 64, 2, 1)
    ctx = _ctx(tmp_path, "cr_ild.consistency_weight=0", models=(teacher, gqa))
    T, d = 16, 16
    relations = forward_flops(gqa.blocks[1].attn.qkv_proj, T) + 2 * T * d * (4 + 2 + 2)
    want = FROZEN * (forward_flops(teacher.blocks[:3], T) + relations)
    want += TRAINED * (forward_flops(gqa.blocks[:1], T) + relations)
    assert method.build("ild", ctx).flops_per_token(T) == want


# ---------------------------------------------------------------------------- through the trainer
def _config(data: Path, out: Path, *overrides: str):
    return load_run_config(CONFIG, [f"data.path={data}", f"output_dir={out}", *overrides])


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_teacher_and_student_see_the_same_mixed_embeddings_through_the_prefetch_path(
    tiny_data, tmp_path
):
    from ted_scale.train.prefetch import TeacherFeed
    from ted_scale.train.trainer import Trainer

    trainer = Trainer(_config(tiny_data, tmp_path / "run", "teacher_prefetch=on"))
    phase = trainer.method.build("ild", trainer.ctx)
    seen = {"teacher": [], "student": []}
    for role, model in (("teacher", trainer.teacher), ("student", trainer.student)):
        model.register_forward_pre_hook(
            lambda _, args, kwargs, role=role: (
                seen[role].append(kwargs["inputs_embeds"].clone())
                if kwargs.get("inputs_embeds") is not None
                else None
            ),
            with_kwargs=True,
        )
    phase.batch_draw.start(10)
    feed = TeacherFeed(
        trainer._loader("train"), phase.tapper, trainer.device, prefetch=True,
        batch_draw=phase.batch_draw,
    )  # fmt: skip
    draws = []
    for _ in range(4):
        item = feed.next()
        draws.append(item.draw["mix_lambda"])
        with torch.no_grad():
            phase.trained(item.input_ids, item.labels, item.tapped, **item.draw)
    # The teacher ran one micro-batch ahead; the student's mixed pass is the first of its two.
    assert len(seen["teacher"]) == 5
    student_mixed = seen["student"]
    assert len(student_mixed) == 4
    for teacher_embeds, student_embeds in zip(seen["teacher"], student_mixed, strict=False):
        assert torch.equal(teacher_embeds, student_embeds)
    assert len(set(draws)) == 4 and all(0.5 <= x < 1.0 for x in draws)
    assert feed.consumed_draw_state()["slots"] == 4  # the prefetched draw is not counted


def _launch(env, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "launch" / "pretrain_ted.py"), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_kill_and_resume_auto_reproduce_the_losses_mixup_included(
    tiny_data, tmp_path, subprocess_env
):
    common = ["--config", str(CONFIG), f"data.path={tiny_data}", "teacher_prefetch=on"]
    common += ["student.dropout=0.1"]  # every draw on: mixup, consistency and dropout masks
    full = _launch(subprocess_env, *common, f"output_dir={tmp_path / 'full'}")
    out = full.communicate(timeout=300)[0]
    assert full.returncode == 0, out

    run = tmp_path / "killed"
    # Mid-ILD, then after ILD with Stage II not yet checkpointed (the phase starts again).
    outputs = []
    for marker in (run / "checkpoints" / "ild-step00000003" / "complete", run / "progress.json"):
        proc = _launch(subprocess_env, *common, f"output_dir={run}", "resume=auto")
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        outputs.append(proc.communicate()[0])
        assert marker.exists(), f"the run ended before writing {marker}"
    assert "ild: resumed from" in outputs[1]
    resumed = _launch(subprocess_env, *common, f"output_dir={run}", "resume=auto")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out

    def losses(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k.startswith(("loss", "stage", "step"))}
            for r in _metrics(path)
        ]

    expected = losses(tmp_path / "full")
    assert losses(run) == expected
    assert [r["stage"] for r in expected] == ["ild"] * 6 + ["stage2"] * 6
    assert all(r["loss_consistency"] > 0 for r in expected[1:6])  # ramped in after step 1
    expected, got = (
        load_file(r / "student_hf" / "model.safetensors") for r in (tmp_path / "full", run)
    )
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_without_mixing_and_consistency_the_ild_loss_is_a_last_layer_lwd_runs_layer_loss(
    tiny_data, tmp_path
):
    """A 1-block student: LWD's only layer is the last one, matched with the last teacher block."""
    from ted_scale.train.trainer import Trainer

    common = ["student.n_layer=1", "stage2.max_steps=5", "log.interval=1", "checkpoint.interval=0"]
    Trainer(_config(tiny_data, tmp_path / "lwd", *common, "method=lwd")).run()
    joint = ["cr_ild.stages=joint", "cr_ild.mixup_alpha=0", "cr_ild.consistency_weight=0"]
    joint += ["cr_ild.objects=hidden", "cr_ild.hidden_fit=linear"]
    Trainer(_config(tiny_data, tmp_path / "cr_ild", *common, *joint)).run()
    keys = ("step", "loss", "loss_ce", "loss_kd", "loss_layer")
    lwd = [[r[k] for k in keys] for r in _metrics(tmp_path / "lwd")]
    cr_ild = [[r[k] for k in keys] for r in _metrics(tmp_path / "cr_ild")]
    assert len(lwd) == 5 and lwd == cr_ild
