"""The GPT-2 model, its Hugging Face interop and student initialisation."""

from ted_scale.model.gpt import GPT, GPTConfig, GPTOutput
from ted_scale.model.hf import export_hf, from_hf_model, load_pretrained, to_hf_model
from ted_scale.model.student import ModelMismatchError, student_from_teacher

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "ModelMismatchError",
    "export_hf",
    "from_hf_model",
    "load_pretrained",
    "student_from_teacher",
    "to_hf_model",
]
