"""Fused linear losses against naive full-logits PyTorch, for the torch and Triton backends; the
KD divergences (`distill.divergence`) against their formulas written out on fp64 logits.

Triton runs on CPU tensors only through its interpreter, which must be on before triton is first
imported (conftest already imports it through transformers). So the Triton cases run here only
when TRITON_INTERPRET=1 was set at start-up; otherwise one test re-runs them in a subprocess.
"""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from ted_scale.kernels import (
    DIVERGENCES,
    default_chunk_size,
    fused_linear_ce_kd,
    fused_linear_cross_entropy,
    fused_linear_kd,
    torch_ops,
)
from ted_scale.kernels.divergences import divergence_chunk_
from ted_scale.kernels.linear_losses import _chunk_ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [
    "torch",
    "cpu",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and INTERPRETING),
            reason="run by test_triton_backend_passes_under_interpreter_subprocess",
        ),
    ),
]

# V above the Triton kernels' 4K block: rows span five blocks, the last one partly masked.
VOCAB, D_STUDENT, D_TEACHER, T, KD_WEIGHT = 20_000, 16, 24, 2.0, 2.5
FP32_TOL, BF16_TOL = 1e-5, 2e-2


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative difference ||actual - expected|| / ||expected|| in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def make_inputs(shape=(3, 5), dtype=torch.float32, seed=0):
    """Student/teacher hidden states and LM heads; teacher tensors are inference tensors."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D_STUDENT, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, D_STUDENT, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, shape, generator=g)
    targets.view(-1)[::4] = -100
    with torch.inference_mode():
        teacher_hidden = torch.randn(*shape, D_TEACHER, generator=g).to(dtype)
        teacher_weight = (torch.randn(VOCAB, D_TEACHER, generator=g) * 0.5).to(dtype)
    return hidden, weight, targets, teacher_hidden, teacher_weight


def naive_kd_rows(hidden, weight, teacher_hidden, teacher_weight, temperature=T):
    """Per-token KL(p_t || p_s) * T^2 from full fp32 logits."""
    log_ps = F.log_softmax(hidden.float() @ weight.float().T / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_hidden.float() @ teacher_weight.float().T / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1) * temperature**2


def naive_ce(hidden, weight, targets):
    logits = hidden.float() @ weight.float().T
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)


def assert_matches(loss, expected, params, tol):
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    assert loss.dtype == torch.float32
    assert rel_diff(loss, expected) <= tol
    for grad, expected_grad, param in zip(grads, expected_grads, params, strict=True):
        assert grad.dtype == param.dtype and grad.shape == param.shape
        assert rel_diff(grad, expected_grad) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_naive_over_uneven_chunks_with_ignored_targets(backend):
    hidden, weight, targets, _, _ = make_inputs()
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4, backend=backend)
    assert_matches(loss, naive_ce(hidden, weight, targets), (hidden, weight), FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_kl_div_matches_naive_with_other_teacher_width(backend, masked):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    mask = targets != -100 if masked else None
    loss = fused_linear_kd(
        hidden, weight, teacher_hidden, teacher_weight,
        temperature=T, mask=mask, chunk_size=4, backend=backend,
    )  # fmt: skip
    rows = naive_kd_rows(hidden, weight, teacher_hidden, teacher_weight)
    expected = rows[mask].mean() if masked else rows.mean()
    assert_matches(loss, expected, (hidden, weight), FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [T, 1.0, 3.0])  # CE's softmax: squared, shared, its own
def test_ce_kd_matches_naive_with_kd_over_kept_targets(backend, temperature):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    loss, ce, kd = fused_linear_ce_kd(
        hidden, weight, targets, teacher_hidden, teacher_weight,
        temperature=temperature, kd_weight=KD_WEIGHT, chunk_size=4, backend=backend,
    )  # fmt: skip
    naive_ce_value = naive_ce(hidden, weight, targets)
    kd_rows = naive_kd_rows(hidden, weight, teacher_hidden, teacher_weight, temperature)
    naive_kd = kd_rows[targets != -100].mean()
    assert not ce.requires_grad and not kd.requires_grad
    assert rel_diff(ce, naive_ce_value) <= FP32_TOL and rel_diff(kd, naive_kd) <= FP32_TOL
    assert_matches(loss, naive_ce_value + KD_WEIGHT * naive_kd, (hidden, weight), FP32_TOL)


MIX = 0.7


def partner_targets(targets):
    """Mixup's second targets: the batch reversed, with its own ignored tokens."""
    partner = targets.flip(0).clone()
    partner.view(-1)[1::5] = -100
    return partner


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_targets_cross_entropy_is_the_mixed_ce_in_one_logits_pass(backend):
    hidden, weight, targets, _, _ = make_inputs()
    targets2 = partner_targets(targets)
    loss = fused_linear_cross_entropy(
        hidden, weight, targets, targets2=targets2, mix=MIX, chunk_size=4, backend=backend
    )
    expected = MIX * naive_ce(hidden, weight, targets) + (1 - MIX) * naive_ce(
        hidden, weight, targets2
    )
    assert_matches(loss, expected, (hidden, weight), FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_targets_ce_kd_mixes_ce_and_keeps_kd_over_the_first_targets(backend):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    targets2 = partner_targets(targets)
    loss, ce, kd = fused_linear_ce_kd(
        hidden, weight, targets, teacher_hidden, teacher_weight, temperature=T,
        kd_weight=KD_WEIGHT, targets2=targets2, mix=MIX, chunk_size=4, backend=backend,
    )  # fmt: skip
    naive_mixed = MIX * naive_ce(hidden, weight, targets) + (1 - MIX) * naive_ce(
        hidden, weight, targets2
    )
    naive_kd = naive_kd_rows(hidden, weight, teacher_hidden, teacher_weight)[targets != -100].mean()
    assert rel_diff(ce, naive_mixed) <= FP32_TOL and rel_diff(kd, naive_kd) <= FP32_TOL
    assert_matches(loss, naive_mixed + KD_WEIGHT * naive_kd, (hidden, weight), FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_give_fp32_loss_and_bf16_grads_close_to_fp32(backend):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs(dtype=torch.bfloat16)
    student, teacher = (hidden, weight), (teacher_hidden, teacher_weight)
    keep = targets != -100
    kw = {"chunk_size": 4, "backend": backend}

    def naive_kd():
        return naive_kd_rows(*student, *teacher)[keep].mean()

    fused = fused_linear_cross_entropy(*student, targets, **kw)
    assert_matches(fused, naive_ce(*student, targets), student, BF16_TOL)
    fused = fused_linear_kd(*student, *teacher, temperature=T, mask=keep, **kw)
    assert_matches(fused, naive_kd(), student, BF16_TOL)
    fused = fused_linear_ce_kd(
        *student, targets, *teacher, temperature=T, kd_weight=KD_WEIGHT, **kw
    )
    assert_matches(
        fused[0], naive_ce(*student, targets) + KD_WEIGHT * naive_kd(), student, BF16_TOL
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_torch_ops_match_naive_over_uneven_row_blocks(monkeypatch, dtype, tol):
    monkeypatch.setattr(torch_ops, "BLOCK_ELEMENTS", 2 * VOCAB)  # chunks of 4 + 3 rows: 2+2, 2+1
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs(dtype=dtype)
    student, teacher = (hidden, weight), (teacher_hidden, teacher_weight)
    keep = targets != -100
    kw = {"chunk_size": 4, "backend": "torch"}

    def naive_kd():
        return naive_kd_rows(*student, *teacher)[keep].mean()

    fused = fused_linear_cross_entropy(*student, targets, **kw)
    assert_matches(fused, naive_ce(*student, targets), student, tol)
    fused = fused_linear_kd(*student, *teacher, temperature=T, mask=keep, **kw)
    assert_matches(fused, naive_kd(), student, tol)
    fused = fused_linear_ce_kd(
        *student, targets, *teacher, temperature=T, kd_weight=KD_WEIGHT, **kw
    )
    assert_matches(fused[0], naive_ce(*student, targets) + KD_WEIGHT * naive_kd(), student, tol)


def test_fp32_student_accepts_bf16_teacher():
    hidden, weight, _, teacher_hidden, teacher_weight = make_inputs()
    teacher_hidden, teacher_weight = teacher_hidden.bfloat16(), teacher_weight.bfloat16()
    loss = fused_linear_kd(
        hidden, weight, teacher_hidden, teacher_weight, temperature=T, chunk_size=4
    )
    expected = naive_kd_rows(hidden, weight, teacher_hidden, teacher_weight).mean()
    assert_matches(loss, expected, (hidden, weight), BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(backend):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    targets = torch.full_like(targets, -100)
    ce = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4, backend=backend)
    loss = fused_linear_ce_kd(
        hidden, weight, targets, teacher_hidden, teacher_weight,
        temperature=T, kd_weight=KD_WEIGHT, chunk_size=4, backend=backend,
    )[0]  # fmt: skip
    for value in (ce, loss):
        grads = torch.autograd.grad(value, (hidden, weight))
        assert value.item() == 0.0 and all(not g.any() for g in grads)


def test_frozen_weight_gets_no_grad_and_hidden_grad_is_unchanged():
    hidden, weight, targets, _, _ = make_inputs()
    frozen = weight.detach()
    fused_linear_cross_entropy(hidden, frozen, targets, chunk_size=4).backward()
    expected = torch.autograd.grad(naive_ce(hidden, frozen, targets), hidden)[0]
    assert frozen.grad is None
    assert rel_diff(hidden.grad, expected) <= FP32_TOL


def test_backward_scales_precomputed_grads_by_grad_output():
    hidden, weight, targets, _, _ = make_inputs()
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert_matches(3.0 * loss, 3.0 * naive_ce(hidden, weight, targets), (hidden, weight), FP32_TOL)


def test_a_second_backward_through_the_same_loss_is_refused():
    """Its gradients were scaled in place by the first: a second would return them scaled twice."""
    hidden, weight, targets, _, _ = make_inputs()
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()


def test_chunk_ops_never_see_more_than_chunk_size_rows(monkeypatch):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    seen = []

    def record(op):
        def wrapped(logits, *args):
            seen.append(logits.shape)
            return op(logits, *args)

        return wrapped

    ops = _chunk_ops("auto", torch.device("cpu"))
    for name in ("cross_entropy_", "kl_div_", "cross_entropy_kl_div_"):
        monkeypatch.setattr(ops, name, record(getattr(ops, name)))
    fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    fused_linear_kd(hidden, weight, teacher_hidden, teacher_weight, temperature=T, chunk_size=4)
    fused_linear_ce_kd(
        hidden, weight, targets, teacher_hidden, teacher_weight,
        temperature=T, kd_weight=KD_WEIGHT, chunk_size=4,
    )  # fmt: skip
    assert [s[0] for s in seen] == [4, 4, 4, 3] * 3 and {s[1] for s in seen} == {VOCAB}


def test_default_chunk_size_bounds_chunk_logits():
    assert default_chunk_size(50_257) == 256
    assert default_chunk_size(2**30) == 1
    assert default_chunk_size(100) * 100 <= 2**24 < default_chunk_size(100) * 200


def test_unknown_backend_is_rejected():
    hidden, weight, targets, _, _ = make_inputs()
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(hidden, weight, targets, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_backend_on_cuda_at_gpt2_vocab(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, vocab = 1000, 64, 50_257
    hidden = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda", generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::7] = -100
    teacher_hidden = torch.randn(n, 2 * d, device="cuda", generator=g).to(dtype)
    teacher_weight = torch.randn(vocab, 2 * d, device="cuda", generator=g).to(dtype) * 0.3
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    results = {}
    for backend in ("torch", "triton"):
        loss, ce, kd = fused_linear_ce_kd(
            hidden, weight, targets, teacher_hidden, teacher_weight,
            temperature=T, kd_weight=KD_WEIGHT, chunk_size=384, backend=backend,
        )  # fmt: skip
        ce_only = fused_linear_cross_entropy(hidden, weight, targets, backend=backend)
        kl_only = fused_linear_kd(
            hidden, weight, teacher_hidden, teacher_weight, temperature=T, backend=backend
        )
        grads = torch.autograd.grad(loss + ce_only + kl_only, (hidden, weight))
        results[backend] = (loss, ce, kd, ce_only, kl_only, *grads)
    for triton_value, torch_value in zip(results["triton"], results["torch"], strict=True):
        assert rel_diff(triton_value, torch_value) <= tol


# ------------------------------------------------------------------ KD divergences
BETA = 0.3


def formula_rows(divergence, hidden, weight, teacher_hidden, teacher_weight, beta=BETA):
    """T^2 * D(p_t, p_s) per token, from the definitions on full fp64 logits."""
    p_s = torch.softmax(hidden.double() @ weight.double().T / T, dim=-1)
    p_t = torch.softmax(teacher_hidden.double() @ teacher_weight.double().T / T, dim=-1)
    if divergence == "forward_kl":
        d = (p_t * (p_t.log() - p_s.log())).sum(-1)
    elif divergence == "reverse_kl":
        d = (p_s * (p_s.log() - p_t.log())).sum(-1)
    elif divergence == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        d = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    else:
        d = 0.5 * (p_t - p_s).abs().sum(-1)
    return d * T**2


def assert_close_with_grads(loss, expected, params):
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    assert loss.dtype == torch.float32
    assert rel_diff(loss, expected) <= FP32_TOL, (loss, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert rel_diff(grad, expected_grad) <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_divergence_matches_its_formula_over_masked_tokens(backend, divergence):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    mask = targets != -100
    loss = fused_linear_kd(
        hidden, weight, teacher_hidden, teacher_weight, temperature=T, divergence=divergence,
        beta=BETA, mask=mask, chunk_size=4, backend=backend,
    )  # fmt: skip
    rows = formula_rows(divergence, hidden, weight, teacher_hidden, teacher_weight)
    assert_close_with_grads(loss, rows[mask].mean(), (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ce_plus_kd_divergence_matches_the_formulas(backend, divergence):
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs()
    loss, ce, kd = fused_linear_ce_kd(
        hidden, weight, targets, teacher_hidden, teacher_weight, temperature=T,
        kd_weight=KD_WEIGHT, divergence=divergence, beta=BETA, chunk_size=4, backend=backend,
    )  # fmt: skip
    expected_kd = formula_rows(divergence, hidden, weight, teacher_hidden, teacher_weight)
    expected_kd = expected_kd[targets != -100].mean()
    expected_ce = naive_ce(hidden.double(), weight.double(), targets)
    assert rel_diff(ce, expected_ce) <= FP32_TOL and rel_diff(kd, expected_kd) <= FP32_TOL
    assert_close_with_grads(loss, expected_ce + KD_WEIGHT * expected_kd, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_divergence_path_gives_the_fused_forward_kl(backend):
    """The generic statistics -> sums -> gradient path, run for forward KL, equals the fused
    one-sweep forward KL the default uses (values and gradient logits)."""
    ops = _chunk_ops(backend, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(6, 5000, generator=g) * 3, torch.randn(6, 5000, generator=g) * 3
    row_weight = torch.full((6,), 1 / 6)
    fused_grad = logits.clone()
    fused = ops.kl_div_(fused_grad, teacher.clone(), row_weight, T)
    generic_grad = teacher.clone()
    generic = divergence_chunk_(
        ops, logits, generic_grad, row_weight, T, "forward_kl", BETA, 1.0, None
    )
    assert rel_diff(generic, fused) <= FP32_TOL
    assert rel_diff(generic_grad, fused_grad) <= FP32_TOL


def test_jsd_is_finite_where_both_distributions_underflow():
    """A column where p_s and p_t are both 0 in fp32 adds 0, not NaN (log m from the logs)."""
    log_p_s = torch.tensor([[-1e-3, -200.0, -150.0]])
    log_p_t = torch.tensor([[-1e-2, -300.0, -160.0]])
    terms, g = torch_ops.divergence_terms("jsd", 0.5, log_p_s, log_p_t)
    assert torch.isfinite(terms).all() and torch.isfinite(g).all()


@pytest.mark.parametrize(("divergence", "beta"), [("kl", 0.5), ("jsd", 0.0), ("jsd", 1.0)])
def test_an_unknown_divergence_or_a_jsd_beta_outside_0_1_is_refused(divergence, beta):
    hidden, weight, _, teacher_hidden, teacher_weight = make_inputs()
    with pytest.raises(ValueError, match=r"divergence must be one of|0 < beta < 1"):
        fused_linear_kd(
            hidden, weight, teacher_hidden, teacher_weight, temperature=T,
            divergence=divergence, beta=beta,
        )  # fmt: skip


@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton; already interpreting")
def test_triton_backend_passes_under_interpreter_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "triton"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------ the CPU kernels' build
def test_cpu_kernels_build_past_a_build_killed_midway(tmp_path):
    """A first build killed while it compiles leaves its staging folder behind, and its ninja and
    compiler running on (they outlive their parent). The next process removes the folder, builds
    in one of its own, renames it into place whole, and computes what torch ops compute."""
    from ted_scale.kernels import cpu_ops

    name = cpu_ops.extension_name()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    build = "from ted_scale.kernels import cpu_ops; cpu_ops.extension()"
    first = subprocess.Popen(
        [sys.executable, "-c", build], env=env, start_new_session=True, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(600):  # torch writes build.ninja, then starts ninja
            if list(tmp_path.glob(f"{name}.building-*/build.ninja")) or first.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        assert first.poll() is None, "the first build ended before it could be killed"
        first.kill()  # the Python process alone, as kill -9 does: ninja and the compiler go on
        first.wait()
        (left,) = tmp_path.glob(f"{name}.building-*")
        # A process of its own: torch's load skips the build of a name it loaded before in-process.
        second = subprocess.run(
            [sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        with contextlib.suppress(ProcessLookupError):  # the orphans, if their build still runs
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 0, second.stderr
    assert f"removing {left}, left by a build that was killed" in second.stderr
    assert not left.exists() and not list(tmp_path.glob(f"{name}.building-*"))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    targets, weight = torch.tensor([[1], [7], [0], [49]]), torch.tensor([[1.0], [0.5], [0], [1]])
    expected = torch_ops.cross_entropy_(logits.clone(), targets, weight)
    built = cpu_ops._import(name, tmp_path / name)  # as every later process imports it
    torch.testing.assert_close(built.cross_entropy_(logits.clone(), targets, weight), expected)


def test_the_pip_ninja_goes_on_path_when_none_is_there(monkeypatch):
    """torch runs `ninja` from PATH, which a virtual environment used without activating it
    lacks; the locked pip package's binary is put first, and runs."""
    import shutil

    import ninja

    from ted_scale.kernels import cpu_ops

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    cpu_ops.put_pip_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    version = subprocess.run(["ninja", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip()


@pytest.mark.parametrize("why", ["turned_off", "no_compiler"])
def test_cpu_losses_fall_back_to_torch_ops_when_the_kernels_cannot_run(why, monkeypatch, capsys):
    from ted_scale.kernels import cpu_ops

    def no_compiler():
        raise RuntimeError("Error building extension: g++: not found")

    if why == "turned_off":
        monkeypatch.setenv(cpu_ops.DISABLE_VARIABLE, "0")
    else:
        monkeypatch.setattr(cpu_ops, "extension", no_compiler)
    cpu_ops.available.cache_clear()
    try:
        assert _chunk_ops("auto", torch.device("cpu")) is torch_ops
    finally:
        cpu_ops.available.cache_clear()
    said = capsys.readouterr().err
    assert ("g++: not found" in said and "torch ops" in said) == (why == "no_compiler")
