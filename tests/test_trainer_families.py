"""Llama-family teachers in the trainer (one process): every method trains end to end (CR-ILD on
relations of grouped heads, MiniDisc pruning whole key/value groups) and the student, and
MiniDisc's TA, export to the teacher's HF class; a tensor-parallel size that cannot split the
teacher's heads is refused before training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from families import SHAPE, assert_export_matches, hf_folder
from transformers import LlamaConfig, Qwen3Config

from ted_scale.distill.methods import get_method, load_run_config
from ted_scale.distill.run_models import build_run_models
from ted_scale.io import read_safetensors
from ted_scale.model import ModelMismatchError, load_pretrained
from ted_scale.parallel.dims import ParallelLayoutError
from ted_scale.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def llama_teacher(tiny_data, tmp_path) -> Path:
    """Grouped-query attention, untied head, Llama 3 rope scaling."""
    rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    }  # fmt: skip
    config = LlamaConfig(
        **SHAPE, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=rope
    )
    return hf_folder(tmp_path / "llama", tiny_data, config)


def _config(name: str, data: Path, out: Path, teacher: Path, *overrides: str):
    return load_run_config(
        REPO / "configs" / name,
        [
            f"data.path={data}",
            f"output_dir={out}",
            f"teacher.pretrained={teacher}",
            "stage1.max_steps=2",
            "stage2.max_steps=3",
            "checkpoint.interval=0",
            *overrides,
        ],
    )


@pytest.fixture
def qwen3_teacher(tiny_data, tmp_path) -> Path:
    """Per-head q/k norm, head_dim 32 (not hidden / heads), q/k/v and output biases, GQA 4:2."""
    config = Qwen3Config(
        **SHAPE, num_key_value_heads=2, head_dim=32, attention_bias=True, tie_word_embeddings=False
    )
    return hf_folder(tmp_path / "qwen3", tiny_data, config)


HF_CLASS = {"llama_teacher": "LlamaForCausalLM", "qwen3_teacher": "Qwen3ForCausalLM"}
"""The HF class each teacher fixture's exports load as."""


def _record_phases(trainer: Trainer) -> list:
    """The phases the trainer's method builds from now on, in order (CR-ILD's Stage II builds its
    own student, the one it exports)."""
    phases, build = [], trainer.method.build

    def recorded(name: str, ctx):
        phases.append(build(name, ctx))
        return phases[-1]

    trainer.method.build = recorded
    return phases


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ted_distils_a_llama_teacher_end_to_end(tiny_data, tmp_path, llama_teacher):
    run = tmp_path / "run"
    trainer = Trainer(_config("tiny-ted.yaml", tiny_data, run, llama_teacher))
    student = trainer.student
    assert student.config.family == "llama" and student.unembed is not None
    assert student.config.rope_scaling.factor == 8.0
    teacher = trainer.teacher.state_dict()
    for k, b in enumerate(trainer.models.layer_map):  # copied from the teacher's blocks
        assert torch.equal(
            student.blocks[k].mlp.gate_proj.weight, teacher[f"blocks.{b}.mlp.gate_proj.weight"]
        )
    assert torch.equal(student.unembed.weight, teacher["unembed.weight"])
    trainer.run()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in metrics if r["stage"] == "stage2"]
    assert stage2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in stage2)
    assert "loss_layer_0" in stage2[-1] and "loss_filter_0" in metrics[0]
    assert_export_matches(run, student, "LlamaForCausalLM")


def test_kd_distils_a_qwen3_teacher_end_to_end(tiny_data, tmp_path):
    """Tied head, per-head q/k norm, one key/value head, head_dim != hidden / heads."""
    config = Qwen3Config(**SHAPE, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    teacher = hf_folder(tmp_path / "qwen3", tiny_data, config)
    run = tmp_path / "run"
    trainer = Trainer(_config("tiny-kd.yaml", tiny_data, run, teacher))
    assert trainer.student.config.qk_norm and trainer.student.unembed is None
    before = trainer.student.blocks[0].attn.q_norm.weight.detach().clone()
    trainer.run()
    assert not torch.equal(trainer.student.blocks[0].attn.q_norm.weight, before)
    assert_export_matches(run, trainer.student, "Qwen3ForCausalLM")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("tiny-ted.yaml", ["method=ted_kl", "filters.arch=next_block"]),  # block copies rotate
        ("tiny-lwd.yaml", []),
        ("tiny-ted.yaml", ["method=lm"]),
    ],
    ids=["ted_kl-next_block", "lwd", "lm"],
)
def test_the_other_methods_of_every_family_train_from_a_llama_teacher(
    tiny_data, tmp_path, llama_teacher, name, overrides
):
    run = tmp_path / "run"
    Trainer(_config(name, tiny_data, run, llama_teacher, *overrides, "log.interval=1")).run()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (run / "student_hf" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("teacher", "objects"),
    [("llama_teacher", "qkv"), ("llama_teacher", "hidden"), ("qwen3_teacher", "qkv")],
)
def test_cr_ild_distils_a_family_teacher_end_to_end(tiny_data, tmp_path, request, teacher, objects):
    folder = request.getfixturevalue(teacher)
    run = tmp_path / "run"
    config = _config("tiny-cr-ild.yaml", tiny_data, run, folder, f"cr_ild.objects={objects}")
    trainer = Trainer(config)
    phases = _record_phases(trainer)
    trainer.run()
    metrics = _metrics(run)
    assert [r["stage"] for r in metrics] == ["ild"] * 2 + ["stage2"] * 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics)
    assert all(r[f"loss_{objects}"] > 0 for r in metrics[:2])
    assert_export_matches(run, phases[-1].evaluated, HF_CLASS[teacher])  # Stage II's student


@pytest.mark.parametrize("teacher", ["llama_teacher", "qwen3_teacher"])
def test_minidisc_prunes_a_family_teacher_into_a_ta_that_exports_to_its_class(
    tiny_data, tmp_path, request, teacher
):
    from ted_scale.distill.methods.minidisc import sorted_importance
    from ted_scale.model.pruning import Importance, extract, subnet_at

    folder = request.getfixturevalue(teacher)
    run = tmp_path / "run"
    steps = ["minidisc.sandwich.max_steps=2", "log.interval=1"]
    trainer = Trainer(_config("tiny-minidisc.yaml", tiny_data, run, folder, *steps))
    trainer.run()
    metrics = _metrics(run)
    assert {r["stage"] for r in metrics} == {"sandwich", "final_stage1_teacher", "final_stage2"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics)
    report = json.loads((run / "minidisc.json").read_text())
    for row in report["candidates"]:
        assert report["teacher_parameters"] > row["parameters"] > report["student_parameters"]
    # The TA is the shared weights' prefix at the chosen sparsity, whole key/value groups kept.
    saved = read_safetensors(run / "minidisc" / "importance.safetensors")[0]
    importance = Importance(
        [saved[f"heads.{i}"] for i in range(4)],
        [saved[f"neurons.{i}"] for i in range(4)],
        group_size=2,
    )
    subnet = subnet_at(sorted_importance(importance), report["ta"]["sparsity"])
    assert all(h % 2 == 0 for h in subnet.heads)
    ta = extract(load_pretrained(run / "minidisc" / "ta_shared_hf"), subnet)
    assert ta.num_params() == report["ta"]["parameters"]
    assert_export_matches(run, ta, HF_CLASS[teacher], folder="ta_hf")
    assert_export_matches(run, trainer.student, HF_CLASS[teacher])


@pytest.mark.parametrize(
    ("key", "layouts"),
    [
        ("tensor_parallel_size", {"dims": SimpleNamespace(tp_size=3)}),
        (  # the teacher alone split over 3 ranks: named by its own key
            "teacher_tensor_parallel_size",
            {"dims": SimpleNamespace(tp_size=1), "teacher_dims": SimpleNamespace(tp_size=3)},
        ),
    ],
)
def test_tensor_parallelism_refuses_a_llama_teacher_it_cannot_split_before_sharding(
    key, layouts, tiny_data, tmp_path, llama_teacher
):
    """A tp=3 run needs three ranks; the refusal comes before anything is sharded, so the models'
    builder is called here with layouts that only say their tensor-parallel sizes. (Sizes that
    split the heads train as one process: tests/test_tensor_parallel_training.py.)"""
    config = _config("tiny-ted.yaml", tiny_data, tmp_path / "run", llama_teacher)
    with pytest.raises(
        ParallelLayoutError,
        match=rf"parallel.{key}=3 does not divide the teacher's attention heads in block 0 \(4\): "
        r".*parallel.tensor_parallel_padding: true .*\(4 -> 6 attention heads",
    ):
        build_run_models(
            config,
            needs_teacher=True,
            model_families=get_method("ted").model_families,
            device=torch.device("cpu"),
            **layouts,
        )


@pytest.mark.parametrize("method", ["cr_ild", "minidisc"])
@pytest.mark.parametrize(
    "key", ["parallel.tensor_parallel_size=2", "parallel.teacher_tensor_parallel_size=2"]
)
def test_cr_ild_and_minidisc_refuse_a_llama_teacher_split_over_ranks_by_name(
    method, key, tiny_data, tmp_path, llama_teacher
):
    """Unsplit, both train from it (above); their per-head sums and sub-networks are not built for
    split or copied key/value heads. Refused before anything is placed (no ranks needed)."""
    name = f"tiny-{method.replace('_', '-')}.yaml"
    config = _config(name, tiny_data, tmp_path / "run", llama_teacher, key)
    chosen = get_method(method)
    with pytest.raises(
        ModelMismatchError,
        match=rf"{key}: method={method} runs tensor-parallel on model families gpt2 only, and "
        rf"the teacher \({llama_teacher}\) is family llama; use it unsplit",
    ):
        build_run_models(
            config,
            needs_teacher=True,
            model_families=chosen.model_families,
            tensor_parallel_families=chosen.tensor_parallel_families,
            device=torch.device("cpu"),
        )


def test_qwen_style_padded_embeddings_distil_over_the_tokenizers_ids(tiny_data, tmp_path):
    """Teacher and student of one family share the tokenizer (512 ids) but not the embedding size
    (640 and 576 rows, as Qwen2.5-7B's 152,064 and Qwen3-0.6B's 151,936 for 151,669 tokens): KD runs
    over
    the 512 ids, padding rows get no gradient; without a folder that ships the tokenizer, extra rows
    are refused."""
    from ted_scale.distill.modules import FrozenTapper

    shape = {**SHAPE, "num_key_value_heads": 2, "tie_word_embeddings": True}
    teacher = hf_folder(tmp_path / "t", tiny_data, Qwen3Config(**{**shape, "vocab_size": 640}))
    student_shape = {**shape, "vocab_size": 576, "num_hidden_layers": 2}
    student = hf_folder(tmp_path / "s", tiny_data, Qwen3Config(**student_shape))
    pretrained = ["student.init=pretrained", f"student.pretrained={student}"]
    trainer = Trainer(_config("tiny-kd.yaml", tiny_data, tmp_path / "run", teacher, *pretrained))
    t, s = trainer.teacher, trainer.student
    assert (t.config.vocab_size, s.config.vocab_size) == (640, 576)
    assert t.vocab_in_use == s.vocab_in_use == 512
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    _, parts = trainer.ctx.distillation()(ids, ids, FrozenTapper(t, [], with_top=True)(ids))
    T = trainer.config.distill.temperature
    log_p_s = torch.log_softmax(s(ids).logits[..., :512].double() / T, -1)
    log_p_t = torch.log_softmax(t(ids).logits[..., :512].double() / T, -1)
    kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * T**2
    torch.testing.assert_close(parts["loss_kd"].double(), kd, rtol=1e-5, atol=1e-7)
    padding = s.lm_head_weight[512:].detach().clone()
    trainer.run()
    assert torch.equal(s.lm_head_weight[512:], padding), "a padding row was trained"

    with pytest.raises(ModelMismatchError, match=r"teacher has a vocabulary of 640 tokens .* 512"):
        Trainer(_config("tiny-kd.yaml", tiny_data, tmp_path / "random", "null",
                        "teacher.arch.vocab_size=640"))  # fmt: skip
