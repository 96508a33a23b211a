"""The throughput benchmark's configurations: model and batch sizes (``Preset``), one measured
configuration (``Spec``), and the run configuration of its step (``bench_config``), shared by the
plain step (``throughput``), the trainer's loop (``engine``) and tensor parallelism."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ted_scale.config.parse import build
from ted_scale.config.schema import RunConfig
from ted_scale.distill.methods import get_method, run_config_class
from ted_scale.model.gpt import GPTConfig

# The paper's Stage II settings for GPT-2 (docs/design.md).
ALPHA_KD, ALPHA_LAYER, TEMPERATURE, DROPOUT = 2.5, 0.1, 2.0, 0.1


@dataclass(frozen=True)
class Preset:
    """Model and batch sizes. Teacher: ``teacher_layers`` x ``width``; student: ``student_layers``
    of the teacher's blocks (paper layer map), same width; linear filters width -> width.

    ``family`` ``gpt2`` is GPT-2's block (``ffn`` null: 4 x width); ``llama`` is the Llama
    family's (RMSNorm, RoPE, SwiGLU FFN ``ffn`` wide, no biases) with ``kv_heads`` key/value heads
    (grouped-query attention) and an LM head of its own unless ``tied_head``."""

    teacher_layers: int
    student_layers: int
    width: int
    heads: int
    vocab: int
    seq_len: int
    micro_batch: int
    warmup: int
    steps: int
    instrumented: int
    family: str = "gpt2"
    kv_heads: int | None = None
    ffn: int | None = None
    tied_head: bool = True

    def arch(self) -> GPTConfig:
        """The teacher's shape (``teacher.arch``), with the paper's dropout."""
        llama = {}  # what GPT-2's block does not have (GPTConfig's defaults mean GPT-2)
        if self.family != "gpt2":
            llama = {
                "family": self.family, "n_kv_head": self.kv_heads, "qkv_bias": False,
                "out_bias": False, "mlp_bias": False, "tie_word_embeddings": self.tied_head,
            }  # fmt: skip
        return GPTConfig(
            vocab_size=self.vocab, n_positions=self.seq_len, n_embd=self.width,
            n_layer=self.teacher_layers, n_head=self.heads, n_inner=self.ffn, dropout=DROPOUT,
            **llama,
        )  # fmt: skip


PRESETS = {
    # The paper's setting: GPT-2 124M -> 6 layers, 1024-token sequences; a GPU preset.
    "gpt2": Preset(12, 6, 768, 12, 50257, 1024, 8, warmup=3, steps=10, instrumented=3),
    # Real vocabulary (the LM head and logits dominate as they do at full size), small trunk.
    "cpu": Preset(4, 2, 256, 4, 50257, 128, 4, warmup=1, steps=5, instrumented=3),
    # The cpu preset at GPT-2's width: per logit, the head's matmuls against the softmax's
    # element-wise work are as in the paper's models (at width 256 that work is 3x their share).
    "cpu-wide": Preset(4, 2, 768, 12, 50257, 128, 4, warmup=1, steps=5, instrumented=3),
    # Smoke-test size (seconds per configuration).
    "micro": Preset(4, 2, 32, 2, 128, 16, 2, warmup=1, steps=2, instrumented=1),
}
# The cpu and micro presets with the Llama family's blocks: GQA 4:2, SwiGLU FFN, untied head.
# cpu-llama's FFN is as wide as Llama's rule makes it (2/3 of 4 x width, rounded up to a multiple
# of 256: 768, 9 d^2 weights against GPT-2's 8 d^2); GPT-2's vocabulary, so that it differs from
# cpu in the blocks and the head only.
PRESETS |= {
    "cpu-llama": replace(PRESETS["cpu"], family="llama", kv_heads=2, ffn=768, tied_head=False),
    "micro-llama": replace(
        PRESETS["micro"], heads=4, family="llama", kv_heads=2, ffn=96, tied_head=False
    ),
}


@dataclass(frozen=True)
class Spec:
    """One configuration. ``impl`` is ``ted_scale`` or ``reference`` (TED only, full logits)."""

    method: str
    fused: bool
    prefetch: bool
    attention: str
    impl: str = "ted_scale"
    compile: bool = False

    @property
    def name(self) -> str:
        if self.impl == "reference":
            return f"reference/{self.attention}"
        loss = "fused" if self.fused else "unfused"
        prefetch = "/prefetch" if self.prefetch else ""
        compiled = "/compiled" if self.compile else ""
        return f"{self.method}/{loss}{prefetch}{compiled}/{self.attention}"


def bench_config(preset: Preset, spec: Spec, *, seed: int = 0) -> RunConfig:
    """The run configuration of ``spec``'s step: a random teacher of the preset's shape, a student
    of its blocks at the paper's map (random for ``lm``, which has no teacher), linear filters
    copied from the teacher's, the paper's Stage II loss weights."""
    needs_teacher = get_method(spec.method).needs_teacher
    raw = {
        "seed": seed,
        "method": spec.method,
        "fused_loss": spec.fused,
        "teacher": {"pretrained": None, "arch": asdict(preset.arch())},
        "student": {
            "init": "teacher_layers" if needs_teacher else "random",
            "n_layer": preset.student_layers,
            "dropout": DROPOUT,
        },
        "model": {"attention": spec.attention, "compile": spec.compile},
        "distill": {"alpha_kd": ALPHA_KD, "alpha_layer": ALPHA_LAYER, "temperature": TEMPERATURE},
        "batch": {"global_batch_size": preset.micro_batch, "micro_batch_size": preset.micro_batch},
    }
    return build(run_config_class(), raw, where="benchmark")
