"""Each HF class of the Llama family as the teacher of a TED run on two CPU ranks under ZeRO-2
(data-parallel; and tensor-parallel for a GQA model whose key/value heads tp 2 splits and for one
whose it copies): killed with SIGKILL after a checkpoint, the run resumes (``resume=auto``) to
exactly the losses and weights of the uninterrupted run, and its exported student loads in
AutoModelForCausalLM as the teacher's class with the project's own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import SHAPE, assert_export_matches, hf_folder
from ranks import killed_and_resumed, run_losses
from safetensors.torch import load_file
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ted_scale.model import load_pretrained

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# What sets each class apart, beside grouped-query attention (4 query heads per 2 or 1 k/v heads).
TEACHERS = {
    "LlamaForCausalLM": lambda: LlamaConfig(
        **SHAPE, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "Qwen2ForCausalLM": lambda: Qwen2Config(  # q/k/v bias
        **SHAPE, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "Qwen3ForCausalLM": lambda: Qwen3Config(  # q/k norm, head_dim != hidden / heads
        **SHAPE, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True
    ),
    "MistralForCausalLM": lambda: MistralConfig(  # a sliding window beyond the context
        **SHAPE, num_key_value_heads=1, sliding_window=4096, tie_word_embeddings=False
    ),
}


# name -> (overrides, the layout line's words, (data-parallel, tensor-parallel) ranks)
LAYOUTS = {
    "dp2": ([], "dp=2 tp=1", (2, 1)),
    "tp2": (["parallel.tensor_parallel_size=2"], "dp=1 tp=2", (1, 2)),
}
CASES = [(family_class, "dp2") for family_class in TEACHERS] + [
    ("LlamaForCausalLM", "tp2"),  # tp 2 splits its 2 key/value heads
    ("Qwen3ForCausalLM", "tp2"),  # and copies Qwen3's one to both ranks
]


@pytest.mark.parametrize(("family_class", "layout"), CASES)
def test_a_family_teacher_run_killed_on_two_ranks_resumes_to_the_uninterrupted_student(
    family_class, layout, tiny_data, tmp_path, subprocess_env
):
    teacher = hf_folder(tmp_path / "teacher", tiny_data, TEACHERS[family_class]())
    overrides, stated, (dp, tp) = LAYOUTS[layout]
    # Stage II long enough that the job is still running when the kill after step 3 lands;
    # dropout on, so that every rank's generators must resume where they were.
    args = [
        "--config", str(REPO / "configs" / "tiny-ted.yaml"), f"data.path={tiny_data}",
        f"teacher.pretrained={teacher}", "deepspeed.zero_stage=2", "student.dropout=0.1",
        "stage1.max_steps=1", "stage2.max_steps=6", "log.interval=1",
        "checkpoint.interval=3", "checkpoint.keep=10", "eval.interval=0", *overrides,
    ]  # fmt: skip
    full, run, out = killed_and_resumed(subprocess_env, 2, args, tmp_path, "stage2-step00000003")
    assert "stage2: resumed from" in out and stated in out
    partitions = run / "checkpoints" / "stage2-step00000006"  # ZeRO: an optimizer shard a rank
    assert {p.name for p in partitions.glob("zero_pp_rank_*_optim_states.pt")} == {
        f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp) for m in range(tp)
    }
    assert run_losses(run) == run_losses(full)  # exactly
    expected, got = (load_file(r / "student_hf" / "model.safetensors") for r in (full, run))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert_export_matches(run, load_pretrained(run / "student_hf"), family_class)
