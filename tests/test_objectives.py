"""Each training loss equals a direct, unfused computation of docs/design.md's formula."""

import pytest
import torch
import torch.nn.functional as F

from ted_scale.distill.filters import FilterBank, build_filters
from ted_scale.distill.layer_map import paper_layer_map, resolve_layer_map
from ted_scale.distill.methods.ted import FilterTraining, ted_distance, ted_kl_distance
from ted_scale.distill.modules import FrozenTapper, StudentDistillation
from ted_scale.distill.objectives import LossSettings, mse_distance
from ted_scale.model import GPT, GPTConfig, student_from_teacher

T_KD = 2.0
A_KD, A_LAYER = 2.5, 0.1


@pytest.fixture
def setup():
    torch.manual_seed(0)
    teacher = GPT(
        GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=2, dropout=0.0)
    )
    teacher.eval().requires_grad_(False)
    layer_map = paper_layer_map(4, 2)
    student = student_from_teacher(teacher, layer_map, dropout=0.0)
    # Perturb the student so that teacher and student differ.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 16))
    labels = torch.randint(0, 97, (2, 16))
    labels[0, :3] = -100
    return teacher, student, layer_map, ids, labels


def _kd(z_s, z_t, keep):
    """KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, mean over kept tokens, from the definition."""
    p_t = F.softmax(z_t[keep] / T_KD, -1)
    kl = (p_t * (F.log_softmax(z_t[keep] / T_KD, -1) - F.log_softmax(z_s[keep] / T_KD, -1))).sum(-1)
    return kl.mean() * T_KD**2


def _divergence(name, z_s, z_t, keep, beta=0.3):
    """T^2 * D(p_t, p_s), mean over kept tokens, from each divergence's definition."""
    p_s = F.softmax(z_s[keep].double() / T_KD, -1)
    p_t = F.softmax(z_t[keep].double() / T_KD, -1)
    if name == "reverse_kl":
        d = (p_s * (p_s / p_t).log()).sum(-1)
    elif name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        d = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    else:
        d = 0.5 * (p_t - p_s).abs().sum(-1)
    return d.mean() * T_KD**2


def _ce(logits, labels):
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _mse_distance(states, tapped, _labels):
    return mse_distance(states, tapped.layer_states)


def _normalized(x, eps=1e-12):
    """A LayerNorm without weight and bias, from its definition."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _student_side(student, method, *, fused, reduction="sum", head=None):
    """Random student filters and the Stage II module around them (as methods/ted.py wires it)."""
    s_filters = build_filters(
        "linear", student, [0, 1], d_out=32, generator=torch.Generator().manual_seed(2)
    )
    distance = _mse_distance
    if method == "ted":
        distance = ted_distance()[1]
    if method == "ted_kl":
        distance = ted_kl_distance(head, LossSettings(fused=fused), temperature=T_KD)
    module = StudentDistillation(
        student,
        LossSettings(fused=fused),
        layer_modules=s_filters,
        layer_distance=distance,
        alpha_kd=A_KD,
        alpha_layer=A_LAYER,
        temperature=T_KD,
        layer_reduction=reduction,
    )
    return s_filters, module


def _ted_tapper(teacher, layer_map, t_filters):
    """The teacher side of TED's Stage II: normalised teacher filter outputs, and its top."""
    transform = ted_distance()[0]
    return FrozenTapper(
        teacher, layer_map, transform=lambda h: transform(t_filters(h)), with_top=True
    )


def _filters(teacher, layer_map):
    generator = torch.Generator().manual_seed(1)
    bank = build_filters("linear", teacher, layer_map, d_out=32, generator=generator)
    return bank.eval().requires_grad_(False)


@pytest.mark.parametrize("fused", [True, False])
def test_stage1_loss_is_the_sum_of_each_filters_cross_entropy_through_the_frozen_head(setup, fused):
    teacher, _, layer_map, ids, labels = setup
    bank = _filters(teacher, layer_map).requires_grad_(True)
    module = FilterTraining(bank, teacher, LossSettings(fused=fused))
    loss, parts = module(ids, labels, FrozenTapper(teacher, layer_map)(ids))
    hidden = teacher(ids, output_layers=layer_map).hidden_states
    expected = [
        _ce(teacher.head(g(hidden[m])), labels)
        for g, m in zip(bank.filters, layer_map, strict=True)
    ]
    torch.testing.assert_close(loss, sum(expected), rtol=1e-5, atol=1e-6)
    for k, e in enumerate(expected):
        torch.testing.assert_close(parts[f"loss_filter_{k}"], e, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in bank.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ted_loss_is_ce_plus_kd_plus_mse_of_normalized_filter_outputs(setup, fused, reduction):
    teacher, student, layer_map, ids, labels = setup
    t_filters = _filters(teacher, layer_map)
    s_filters, module = _student_side(student, "ted", fused=fused, reduction=reduction)
    tapper = _ted_tapper(teacher, layer_map, t_filters)
    loss, parts = module(ids, labels, tapper(ids))

    t_out = teacher(ids, output_layers=layer_map)
    s_out = student(ids, output_layers=[0, 1])
    keep = labels != -100
    ce = _ce(s_out.logits, labels)
    kd = _kd(s_out.logits, t_out.logits, keep)
    per_layer = [
        F.mse_loss(
            _normalized(g_s(s_out.hidden_states[k])), _normalized(g_t(t_out.hidden_states[m]))
        )
        for k, (g_s, g_t, m) in enumerate(
            zip(s_filters.filters, t_filters.filters, layer_map, strict=True)
        )
    ]
    d_ted = sum(per_layer) / (len(per_layer) if reduction == "mean" else 1)
    torch.testing.assert_close(loss, ce + A_KD * kd + A_LAYER * d_ted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["loss_ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["loss_kd"], kd, rtol=1e-5, atol=1e-6)
    for k, d in enumerate(per_layer):
        torch.testing.assert_close(parts[f"loss_layer_{k}"], d, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["layer_to_ce"], A_LAYER * d_ted / ce, rtol=1e-5, atol=1e-7)


def test_ted_distance_ignores_each_filter_outputs_scale_and_offset(setup):
    teacher, student, layer_map, ids, labels = setup
    t_filters = _filters(teacher, layer_map)
    s_filters, module = _student_side(student, "ted", fused=True)
    tapped = _ted_tapper(teacher, layer_map, t_filters)(ids)

    def scaled(factor: float, shift: float = 0.0):
        with torch.no_grad():
            for g in s_filters.filters:
                g.proj.weight.mul_(factor)
                g.proj.bias.mul_(factor).add_(shift)
        return module(ids, labels, tapped)[1]["loss_layer"]

    # Outputs scaled by 1000, then by 1e-4 (std ~1e-5, below a LayerNorm's usual eps), and every
    # token shifted by a constant: the distance stays.
    before = scaled(1.0)
    torch.testing.assert_close(scaled(1000.0, shift=3.0), before, rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled(1e-4), before, rtol=1e-5, atol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("head", ["frozen", "student"])
def test_ted_kl_loss_uses_kl_between_filter_predictions_through_the_heads(setup, fused, head):
    """``frozen`` (the default): the student filters' predictions go through the Stage I head, the
    teacher's final LayerNorm and LM head, which the KL leaves untouched; ``student``: through the
    student's own."""
    teacher, student, layer_map, ids, labels = setup
    t_filters = _filters(teacher, layer_map)
    head_model = teacher if head == "frozen" else student
    s_filters, module = _student_side(student, "ted_kl", fused=fused, head=head_model)
    tapper = FrozenTapper(
        teacher,
        layer_map,
        transform=lambda states: [teacher.ln_f(g) for g in t_filters(states)],
        with_top=True,
    )
    loss, _ = module(ids, labels, tapper(ids))

    t_out = teacher(ids, output_layers=layer_map)
    s_out = student(ids, output_layers=[0, 1])
    keep = labels != -100
    d = sum(
        _kd(
            head_model.head(g_s(s_out.hidden_states[k])),
            teacher.head(g_t(t_out.hidden_states[m])),
            keep,
        )
        for k, (g_s, g_t, m) in enumerate(
            zip(s_filters.filters, t_filters.filters, layer_map, strict=True)
        )
    )
    expected = (
        _ce(s_out.logits, labels) + A_KD * _kd(s_out.logits, t_out.logits, keep) + A_LAYER * d
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in s_filters.parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_kd_loss_is_ce_plus_alpha_kd(setup, fused):
    teacher, student, _, ids, labels = setup
    module = StudentDistillation(
        student, LossSettings(fused=fused), alpha_kd=A_KD, temperature=T_KD
    )
    tapper = FrozenTapper(teacher, [3], with_top=True)
    loss, parts = module(ids, labels, tapper(ids))
    s_logits, t_logits = student(ids).logits, teacher(ids).logits
    expected = _ce(s_logits, labels) + A_KD * _kd(s_logits, t_logits, labels != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert "loss_layer" not in parts


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_kd_term_is_the_configured_divergence(setup, fused, divergence):
    teacher, student, _, ids, labels = setup
    settings = LossSettings(fused=fused, divergence=divergence, jsd_beta=0.3)
    module = StudentDistillation(student, settings, alpha_kd=A_KD, temperature=T_KD)
    loss, parts = module(ids, labels, FrozenTapper(teacher, [3], with_top=True)(ids))
    s_logits, t_logits = student(ids).logits, teacher(ids).logits
    expected_kd = _divergence(divergence, s_logits, t_logits, labels != -100)
    torch.testing.assert_close(parts["loss_kd"].double(), expected_kd, rtol=1e-5, atol=1e-7)
    expected = _ce(s_logits, labels).double() + A_KD * expected_kd
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_kd_alone_without_ce_is_cr_ilds_second_stage(setup):
    teacher, student, _, ids, labels = setup
    module = StudentDistillation(student, LossSettings(), alpha_kd=A_KD, temperature=T_KD,
                                 with_ce=False)  # fmt: skip
    loss, parts = module(ids, labels, FrozenTapper(teacher, [3], with_top=True)(ids))
    expected = _kd(student(ids).logits, teacher(ids).logits, labels != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"loss_kd"}


@pytest.mark.parametrize("fused", [True, False])
def test_lwd_loss_projects_student_states_onto_raw_teacher_states(setup, fused):
    teacher, student, layer_map, ids, labels = setup
    torch.manual_seed(3)
    projections = FilterBank([torch.nn.Linear(32, 32) for _ in range(2)], [0, 1])
    module = StudentDistillation(
        student,
        LossSettings(fused=fused),
        layer_modules=projections,
        layer_distance=_mse_distance,
        alpha_kd=A_KD,
        alpha_layer=A_LAYER,
        temperature=T_KD,
    )
    loss, _ = module(ids, labels, FrozenTapper(teacher, layer_map, with_top=True)(ids))
    t_out = teacher(ids, output_layers=layer_map)
    s_out = student(ids, output_layers=[0, 1])
    d_layer = sum(  # averaged over layers: the default reduction
        F.mse_loss(w(s_out.hidden_states[k]), t_out.hidden_states[m])
        for k, (w, m) in enumerate(zip(projections.filters, layer_map, strict=True))
    ) / len(layer_map)
    expected = _ce(s_out.logits, labels) + A_KD * _kd(s_out.logits, t_out.logits, labels != -100)
    torch.testing.assert_close(loss, expected + A_LAYER * d_layer, rtol=1e-5, atol=1e-6)


def test_fused_and_unfused_paths_give_the_same_gradients(setup):
    teacher, student, layer_map, ids, labels = setup
    t_filters = _filters(teacher, layer_map)
    grads = []
    for fused in (True, False):
        _, module = _student_side(student, "ted", fused=fused)
        student.zero_grad()
        module(ids, labels, _ted_tapper(teacher, layer_map, t_filters)(ids))[0].backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (4, 2, [0, 3]),
        (12, 12, list(range(12))),
        (24, 6, [2, 6, 10, 15, 19, 23]),
    ],
)
def test_paper_layer_map(teacher_layers, student_layers, expected):
    assert paper_layer_map(teacher_layers, student_layers) == expected


def test_layer_map_pointing_past_the_teacher_is_refused():
    with pytest.raises(ValueError, match=r"teacher blocks \[12\].*0\.\.11"):
        resolve_layer_map([0, 2, 4, 7, 9, 12], 12, 6)


@pytest.mark.parametrize("arch", ["linear", "mlp", "next_block", "rest_blocks"])
def test_every_filter_architecture_maps_to_teacher_width(setup, arch):
    teacher, _, layer_map, ids, _ = setup
    generator = torch.Generator().manual_seed(0)
    bank = build_filters(arch, teacher, layer_map, d_out=32, generator=generator, mlp_hidden=16)
    hidden = teacher(ids, output_layers=layer_map).hidden_states
    outs = bank([hidden[m] for m in layer_map])
    assert [o.shape for o in outs] == [torch.Size([2, 16, 32])] * 2
    assert all(p.requires_grad for p in bank.parameters())
    if arch == "rest_blocks":  # tapped at block 0: copies of blocks 1..3
        assert len(bank.filters[0].blocks) == 3 and len(bank.filters[1].blocks) == 0
