"""TED's layer term has a scale of its own (docs/design.md, "Fidelity"): MLP filters move the
student, the layer term's gradient is of the prediction terms' order for every filter, and the
filters start random from the run's seed (identity on request)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ted_scale.config import ConfigError
from ted_scale.distill.filters import build_filters
from ted_scale.distill.layer_map import paper_layer_map
from ted_scale.distill.methods import load_run_config
from ted_scale.distill.methods.ted import TED, ted_distance
from ted_scale.distill.modules import FrozenTapper, StudentDistillation
from ted_scale.distill.objectives import LossSettings
from ted_scale.model import GPT, GPTConfig, student_from_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _train(config_file: str, run: Path, data: Path, *extra: str) -> dict[str, torch.Tensor]:
    from ted_scale.train.trainer import Trainer

    overrides = ["log.interval=1", "checkpoint.interval=0", "stage1.max_steps=3"]
    overrides += ["stage2.max_steps=3", f"data.path={data}", f"output_dir={run}", *extra]
    Trainer(load_run_config(REPO / "configs" / config_file, overrides)).run()
    return load_file(run / "student_hf" / "model.safetensors")


def test_ted_with_mlp_filters_moves_the_student_differently_from_kd(tiny_data, tmp_path):
    """Before the layer term had a scale, MLP filters' outputs (std ~0.02) made it ~1e-7: the
    student trained as under KD to five digits."""
    kd = _train("tiny-kd.yaml", tmp_path / "kd", tiny_data)
    ted = _train("tiny-ted.yaml", tmp_path / "ted", tiny_data, "filters.arch=mlp")
    assert kd.keys() == ted.keys()
    relative = max(((ted[k] - kd[k]).norm() / kd[k].norm()).item() for k in kd)
    assert relative > 1e-4, relative


# ---------------------------------------------------------------------------- gradient balance
def _gradient_ratio(arch: str) -> float:
    """||grad of alpha_layer * D_TED|| / ||grad of CE + alpha_kd * KD|| over the student's blocks,
    at the config defaults, for a student copied from a tiny teacher's blocks and perturbed, with
    filters at their default init and the student's copied from the teacher's."""
    defaults = load_run_config(REPO / "configs" / "tiny-ted.yaml", []).distill
    torch.manual_seed(0)
    teacher = GPT(
        GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=2, dropout=0.0)
    )
    teacher.eval().requires_grad_(False)
    layer_map = paper_layer_map(4, 2)
    student = student_from_teacher(teacher, layer_map, dropout=0.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids, labels = torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32))
    generator = torch.Generator().manual_seed(0)
    t_filters = build_filters(arch, teacher, layer_map, d_out=32, generator=generator)
    t_filters.eval().requires_grad_(False)
    s_filters = copy.deepcopy(t_filters).requires_grad_(True)
    transform, distance = ted_distance()
    tapped = FrozenTapper(
        teacher, layer_map, transform=lambda h: transform(t_filters(h)), with_top=True
    )(ids)
    knobs = {"alpha_kd": defaults.alpha_kd, "temperature": defaults.temperature}
    ted = StudentDistillation(
        student,
        LossSettings(),
        layer_modules=s_filters,
        layer_distance=distance,
        alpha_layer=defaults.alpha_layer,
        layer_reduction=defaults.layer_reduction,
        **knobs,
    )
    kd = StudentDistillation(student, LossSettings(), **knobs)
    blocks = list(student.blocks.parameters())
    total = torch.autograd.grad(ted(ids, labels, tapped)[0], blocks)
    prediction = torch.autograd.grad(kd(ids, labels, tapped)[0], blocks)
    layer = [t - p for t, p in zip(total, prediction, strict=True)]
    norm = lambda grads: torch.cat([g.flatten() for g in grads]).norm()  # noqa: E731
    return (norm(layer) / norm(prediction)).item()


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_the_layer_terms_gradient_is_of_the_prediction_terms_order(arch):
    ratio = _gradient_ratio(arch)
    print(f"{arch}: layer / prediction gradient norm on the student's blocks = {ratio:.3g}")
    assert 1e-2 <= ratio <= 1e2, ratio


# ---------------------------------------------------------------------------- filter init
def _method_filters(seed: int, *overrides: str):
    config = load_run_config(REPO / "configs" / "tiny-ted.yaml", [f"seed={seed}", *overrides])
    torch.manual_seed(0)
    teacher = GPT(config.teacher.arch)
    ctx = SimpleNamespace(config=config, teacher=teacher, device=torch.device("cpu"))
    return TED._new_filters(ctx, teacher, [0, 3], "teacher")


def test_filters_start_random_from_the_runs_seed_by_default():
    assert load_run_config(REPO / "configs" / "tiny-ted.yaml", []).filters.init == "random"
    a, again, other = _method_filters(1), _method_filters(1), _method_filters(2)
    for k, w in a.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], w, rtol=0, atol=0)
    weight = a.filters[0].proj.weight
    assert not torch.equal(weight, other.filters[0].proj.weight)
    assert abs(weight.std().item() - 0.02) < 0.002
    assert not torch.equal(weight, a.filters[1].proj.weight)  # each filter its own draw


def test_identity_init_starts_square_linear_filters_at_the_identity():
    bank = _method_filters(1, "filters.init=identity")
    for g in bank.filters:
        torch.testing.assert_close(g.proj.weight, torch.eye(64), rtol=0, atol=0)
        assert not g.proj.bias.any()


@pytest.mark.parametrize("arch", ["mlp", "next_block", "rest_blocks"])
def test_identity_init_of_a_filter_that_is_not_linear_is_refused_naming_the_key(arch):
    with pytest.raises(ConfigError, match=rf"filters\.init=identity .*filters\.arch={arch}"):
        load_run_config(
            REPO / "configs" / "tiny-ted.yaml", ["filters.init=identity", f"filters.arch={arch}"]
        )


def test_identity_init_of_a_non_square_filter_is_refused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="square linear"):
        build_filters("linear", model, [0], d_out=32, generator=torch.Generator(), init="identity")


def test_defaults_layer_average_and_frozen_ted_kl_head():
    config = load_run_config(REPO / "configs" / "tiny-ted.yaml", ["method=ted_kl"])
    assert (config.distill.layer_reduction, config.ted_kl.head) == ("mean", "frozen")
    with pytest.raises(ConfigError, match=r"ted_kl\.head"):
        load_run_config(REPO / "configs" / "tiny-ted.yaml", ["ted_kl.head=teacher"])


@pytest.mark.parametrize("arch", ["next_block", "rest_blocks"])
def test_block_filters_of_a_model_split_over_ranks_are_refused_by_name(arch, tiny_gpt):
    """A copy of a split block would be one rank's shard: refused before anything trains."""
    config = load_run_config(None, [f"filters.arch={arch}"])
    tiny_gpt.tensor_parallel = SimpleNamespace()  # what parallelize_gpt sets: a layout
    ctx = SimpleNamespace(config=config, teacher=tiny_gpt, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=rf"filters.arch={arch} with the teacher split over"):
        TED._new_filters(ctx, tiny_gpt, [0], "teacher")
