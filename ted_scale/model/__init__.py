"""The model (GPT-2 and the Llama family), its Hugging Face interop, student initialisation and
structured pruning."""

from ted_scale.model.gpt import FAMILIES, GPT, GPTConfig, GPTOutput, Subnet
from ted_scale.model.hf import export_hf, from_hf_model, load_pretrained, to_hf_model
from ted_scale.model.student import ModelMismatchError, set_dropout, student_from_teacher

__all__ = [
    "FAMILIES",
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "ModelMismatchError",
    "Subnet",
    "export_hf",
    "from_hf_model",
    "load_pretrained",
    "set_dropout",
    "student_from_teacher",
    "to_hf_model",
]
