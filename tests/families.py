"""Tiny random HF models of the Llama family for the trainer's tests, saved as a hub checkpoint
is (an HF folder with the tiny data's tokenizer, so that a run checks they agree), and the check
that a run's exported student is its teacher's HF class."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from ted_scale.data.tokenizer import load_tokenizer
from ted_scale.model import load_pretrained

# The tiny data's 512-token BPE and 64-token samples; 4 blocks, as configs/tiny-*.yaml's teacher.
SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=64,
)  # fmt: skip


def hf_folder(path: Path, data: Path, hf_config: PretrainedConfig) -> Path:
    """A random model of ``hf_config``'s HF class (seed 0) saved in ``path`` with the data's
    tokenizer."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    load_tokenizer(str(data / "tokenizer")).save_pretrained(path)
    return path


def assert_export_matches(
    run: Path, student: torch.nn.Module, family_class: str, folder: str = "student_hf"
) -> None:
    """The run's exported ``folder`` loads in AutoModelForCausalLM, as its teacher's class in
    fp32, with the logits [2, 64, 512] of ``student`` (the model it exported); so does
    ``load_pretrained``."""
    auto = AutoModelForCausalLM.from_pretrained(run / folder).eval()
    assert type(auto).__name__ == family_class and auto.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student.eval()(ids).logits
        torch.testing.assert_close(auto(ids).logits, expected, atol=1e-5, rtol=0)
        reloaded = load_pretrained(run / folder).eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
