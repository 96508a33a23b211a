"""Llama-family teachers in the trainer (one process): TED and KD train end to end and the student
exports to its teacher's HF class; what is GPT-2 only for now, and a tensor-parallel size that
cannot split the teacher's heads, are refused before training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ted_scale.data.tokenizer import load_tokenizer
from ted_scale.distill.methods import get_method, load_run_config
from ted_scale.distill.run_models import build_run_models
from ted_scale.model import ModelMismatchError, load_pretrained
from ted_scale.parallel.dims import ParallelLayoutError
from ted_scale.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
# The tiny data's 512-token BPE and 64-token samples; 4 blocks, as configs/tiny-*.yaml's teacher.
SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=64,
)  # fmt: skip


def _teacher_folder(path: Path, data: Path, hf_config) -> Path:
    """A random HF teacher saved with the data's tokenizer (so the run checks they agree)."""
    model_class = LlamaForCausalLM if isinstance(hf_config, LlamaConfig) else Qwen3ForCausalLM
    torch.manual_seed(0)
    model_class(hf_config).save_pretrained(path)
    load_tokenizer(str(data / "tokenizer")).save_pretrained(path)
    return path


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
    return _teacher_folder(tmp_path / "llama", tiny_data, config)


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


def _assert_export_matches(run: Path, student: torch.nn.Module, family_class: str) -> None:
    """The run's exported student loads in AutoModelForCausalLM, as its teacher's class, with the
    trained student's logits."""
    auto = AutoModelForCausalLM.from_pretrained(run / "student_hf").eval()
    assert type(auto).__name__ == family_class
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student.eval()(ids).logits
        torch.testing.assert_close(auto(ids).logits, expected, atol=1e-5, rtol=0)
        reloaded = load_pretrained(run / "student_hf").eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)


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
    _assert_export_matches(run, student, "LlamaForCausalLM")


def test_kd_distils_a_qwen3_teacher_end_to_end(tiny_data, tmp_path):
    """Tied head, per-head q/k norm, one key/value head, head_dim != hidden / heads."""
    config = Qwen3Config(**SHAPE, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    teacher = _teacher_folder(tmp_path / "qwen3", tiny_data, config)
    run = tmp_path / "run"
    trainer = Trainer(_config("tiny-kd.yaml", tiny_data, run, teacher))
    assert trainer.student.config.qk_norm and trainer.student.unembed is None
    before = trainer.student.blocks[0].attn.q_norm.weight.detach().clone()
    trainer.run()
    assert not torch.equal(trainer.student.blocks[0].attn.q_norm.weight, before)
    _assert_export_matches(run, trainer.student, "Qwen3ForCausalLM")


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


@pytest.mark.parametrize("method", ["cr_ild", "minidisc"])
def test_a_method_implemented_for_gpt2_only_refuses_a_llama_teacher_before_training(
    tiny_data, tmp_path, llama_teacher, method
):
    run = tmp_path / "run"
    config = _config(f"tiny-{method.replace('_', '-')}.yaml", tiny_data, run, llama_teacher)
    with pytest.raises(
        ModelMismatchError,
        match=rf"method={method} is implemented for model families gpt2 only, and the teacher "
        rf"\({llama_teacher}\) is family llama",
    ):
        Trainer(config)
    assert not (run / "checkpoints").exists()


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


def test_qwen_style_padded_embeddings_distil_over_the_tokenizers_ids(tiny_data, tmp_path):
    """Teacher and student of one family share the tokenizer (512 ids) but not the embedding size
    (640 and 576 rows, as Qwen2.5-7B's 152,064 and Qwen3-0.6B's 151,936 for 151,669 tokens): KD runs
    over
    the 512 ids, padding rows get no gradient; without a folder that ships the tokenizer, extra rows
    are refused."""
    from ted_scale.distill.modules import FrozenTapper

    shape = {**SHAPE, "num_key_value_heads": 2, "tie_word_embeddings": True}
    teacher = _teacher_folder(
        tmp_path / "t", tiny_data, Qwen3Config(**{**shape, "vocab_size": 640})
    )
    student_shape = {**shape, "vocab_size": 576, "num_hidden_layers": 2}
    student = _teacher_folder(tmp_path / "s", tiny_data, Qwen3Config(**student_shape))
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
