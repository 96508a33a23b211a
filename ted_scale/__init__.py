"""ted_scale: task-aware layer-wise distillation (TED) of GPT-2 language models at scale."""

__version__ = "0.1.0"
