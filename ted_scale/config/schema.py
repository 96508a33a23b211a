"""The run configuration: every core key a YAML file under ``configs/`` may set, with its default.

Each distillation method adds its own section (``filters:`` for TED, ...; see
``ted_scale.distill.methods``). docs/configuration.md is written from these dataclasses;
keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ted_scale.config.parse import ConfigError, bounded
from ted_scale.model.gpt import GPTConfig

Stage = Literal["filters", "distill", "all", "lm"]


@dataclass
class TeacherConfig:
    pretrained: str | None = "gpt2"
    """HF hub name or local HF folder (GPT-2 or the Llama family: ``model.hf.HF_CLASSES``); null
    builds a randomly initialised teacher from ``arch``."""
    arch: GPTConfig = field(default_factory=GPTConfig)
    """Shape of a random teacher (used only when ``pretrained`` is null)."""


@dataclass
class StudentConfig:
    init: Literal["teacher_layers", "pretrained", "random"] = "teacher_layers"
    """``teacher_layers``: copy teacher blocks at the layer map; ``pretrained``: load ``pretrained``;
    ``random``: the teacher's shape with ``n_layer`` blocks, randomly initialised."""
    pretrained: str | None = None
    n_layer: int = bounded(6, ge=1)
    layer_map: list[int] | None = None
    """0-based teacher block matched with each student block; null = the paper's map M(k)."""
    dropout: float = bounded(0.1, ge=0.0, lt=1.0)


@dataclass
class ModelConfig:
    attention: Literal["auto", "sdpa", "flash", "eager"] = "auto"
    activation_checkpointing: bool = False
    """Recompute each student block in the backward pass (less memory, ~30 % more compute)."""
    compile: bool | None = None
    """``torch.compile`` each block of the student and the frozen teacher; null: on with CUDA,
    off on a CPU (where inductor's compile time rarely pays for itself)."""


@dataclass
class DistillConfig:
    """The knobs every distillation method shares: CE + alpha_kd * KD + alpha_layer * D."""

    alpha_kd: float = bounded(2.5, ge=0.0)
    alpha_layer: float = bounded(0.1, ge=0.0)
    temperature: float = bounded(2.0, ge=1e-3)
    """Softmax temperature of KD. Below 1e-3 the T^2 factor (<= 1e-6) erases the term and the
    softmax is an argmax: such a value is a typo, refused (docs/design.md, "Config validation")."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    """KD's D in T^2 * D(p_t, p_s) at temperature T, in every method with a KD term:
    ``forward_kl`` KL(p_t || p_s) (Hinton's KD; the paper's), ``reverse_kl`` KL(p_s || p_t)
    (mode-seeking, as in MiniLLM), ``jsd`` the generalized JSD of ``jsd_beta`` (GKD / TRL), ``tvd``
    total variation. TED-KL's layer term stays forward KL, its definition."""
    jsd_beta: float = bounded(0.5, gt=0.0, lt=1.0)
    """JSD's beta: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s;
    0.5 is the symmetric JSD. Read only with ``divergence: jsd``."""
    layer_reduction: Literal["mean", "sum"] = "mean"
    """How per-layer distances combine into D_TED / D_layer: ``mean`` over the K layers, as the
    TED authors' code (``layer_averaged_mse_loss``; the paper's alpha_layer 0.1 is in this
    convention, whatever K), or ``sum`` as Eq. 6 writes it (alpha_layer then acts K times larger)."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = bounded(1, ge=1)
    """Ranks that shard each model's weights (Megatron-style); world = data-parallel x this."""
    teacher_tensor_parallel_size: int | None = bounded(None, ge=1)
    """Ranks that shard the teacher alone: with ``tensor_parallel_size: 1`` each group of this
    many consecutive ranks holds one teacher split Megatron-style and runs it on the group's
    micro-batches together, while the student is purely data-parallel (ZeRO) over every rank.
    null: the same as ``tensor_parallel_size`` (teacher and student split alike)."""
    tensor_parallel_padding: bool = False
    """Pad blocks whose heads or FFN width the tensor-parallel size does not split with zero
    heads and neurons (exact; they cost their compute): e.g. GPT-2 XL's 25 heads at tp 2 or 4;
    under grouped-query attention whole zero key/value groups. Off: such a model is refused,
    naming the block."""
    sequence_parallel: bool = False
    """Shard the LayerNorm/dropout regions along the sequence (needs tensor parallelism)."""
    peer_timeout_s: float = bounded(120.0, ge=0)
    """A rank that has not answered for this long (its node died, hangs or is cut off) stops
    every rank with a message naming it; 0: off, and a lost node leaves the others waiting in a
    collective until the process group's timeout (30 min gloo, 10 min NCCL). See multinode.md."""

    @property
    def teacher_size(self) -> int:
        """The teacher's tensor-parallel size (``teacher_tensor_parallel_size`` or the shared one)."""
        return self.teacher_tensor_parallel_size or self.tensor_parallel_size

    @property
    def teacher_apart(self) -> bool:
        """Whether the teacher is split over a group of its own, the student purely data-parallel."""
        return self.teacher_size != self.tensor_parallel_size

    def __post_init__(self) -> None:
        if self.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel: sequence parallelism is not implemented yet; the "
                "LayerNorm and dropout regions stay replicated over the tensor-parallel ranks "
                "(set it to false)"
            )


@dataclass
class DataConfig:
    path: str = "data/openwebtext"
    """A directory written by ``launch/prepare_data.py`` (holds ``manifest.json``)."""
    train_split: str = "train"
    eval_split: str = "test"
    verify_checksums: Literal["first", "always", "never"] = "first"


@dataclass
class BatchConfig:
    global_batch_size: int = bounded(4000, ge=1)
    """Sequences per optimizer step, across all ranks and accumulation steps."""
    micro_batch_size: int = bounded(8, ge=1)
    """Sequences per rank per forward/backward."""


@dataclass
class OptimConfig:
    lr: float = bounded(2.5e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = bounded(1e-6, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0)
    warmup_ratio: float = bounded(0.05, ge=0.0, le=1.0)
    min_lr_ratio: float = bounded(0.0, ge=0.0, le=1.0)
    """The linear decay ends at ``lr * min_lr_ratio``."""
    grad_clip: float = bounded(1.0, ge=0.0)
    """Global gradient-norm clip; 0 turns clipping off."""

    def __post_init__(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must each be in [0, 1), got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    epochs: float = bounded(1.0, gt=0.0)
    max_steps: int | None = bounded(None, ge=1)
    """Optimizer steps; overrides ``epochs`` when set."""
    lr: float | None = bounded(None, gt=0.0)
    """Overrides ``optim.lr`` for this stage."""


@dataclass
class LogConfig:
    interval: int = bounded(10, ge=1)
    """Optimizer steps between metrics lines."""
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    interval: int = bounded(1000, ge=0)
    """Optimizer steps between checkpoints; 0 saves only at the end of each stage."""
    keep: int = bounded(2, ge=1)
    """Newest complete checkpoints kept on disk."""


@dataclass
class EvalConfig:
    interval: int = bounded(0, ge=0)
    """Optimizer steps between in-training evaluations; 0 turns them off."""
    heldout_batches: int = bounded(20, ge=1)
    lambada_examples: int = bounded(500, ge=1)
    """Size of the fixed LAMBADA subset (the first N passages)."""
    lambada_path: str | None = None
    """LAMBADA jsonl file; null = the copy bundled with ted_scale."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int | None = bounded(None, ge=0, le=3)
    """ZeRO stage 0-3; null: 1 (optimizer states partitioned) over several data-parallel ranks or
    with ``offload_optimizer``, and 0 on one rank, where ZeRO-1 partitions nothing and its
    flat-buffer copies and fp64 gradient norm only cost time (docs/throughput.md)."""
    offload_optimizer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged last into the generated DeepSpeed config (for options not modelled here)."""

    def stage_at(self, dp_size: int) -> int:
        """The ZeRO stage a run with ``dp_size`` data-parallel ranks uses (``zero_stage``)."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 1 if dp_size > 1 or self.offload_optimizer else 0


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = bounded(1234, ge=0, lt=2**32)
    """Seeds Python, NumPy and torch (NumPy takes 0 <= seed < 2**32)."""
    stage: Stage = "all"
    """Which of the method's phases run: ``filters`` (Stage I: its preparation phases),
    ``distill`` (Stage II: the phases that train the student), ``all`` (every phase, in order).
    ``lm`` is short for ``method: lm`` (one model, plain next-token loss)."""
    method: str = "ted"
    """A registered method: ``ted``, ``ted_kl``, ``kd``, ``lwd``, ``cr_ild``, ``lm`` (student
    alone)."""
    resume: str = "auto"
    """``auto`` continues from the newest complete checkpoint, ``never`` starts afresh (refusing
    a non-empty run directory), or a path to a checkpoint directory."""
    filters_from: str | None = None
    """A ``filters/`` directory from an earlier Stage I (for ``stage: distill``); default: this
    run's own ``output_dir/filters``."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU. Loss math is always fp32."""
    fused_loss: bool = True
    """Chunked LM-head losses that never hold full vocabulary-sized logits."""
    teacher_prefetch: Literal["auto", "on", "off"] = "auto"
    """Compute the teacher's outputs one micro-batch ahead on a side CUDA stream (``auto``: on
    CUDA). ``on`` without CUDA keeps the look-ahead order but runs the teacher inline."""
    skip_nonfinite: int = bounded(0, ge=0)
    """Steps with a non-finite loss that may be skipped before the run stops."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage1: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Stage I (filters) schedule."""
    stage2: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=4.0))
    """Stage II (distillation) schedule; also the schedule of ``method: lm``."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.stage == "lm":
            self.method, self.stage = "lm", "all"
        if self.student.init == "pretrained" and not self.student.pretrained:
            raise ConfigError("student.init is 'pretrained' but student.pretrained is not set")
        if (
            self.student.layer_map is not None
            and len(self.student.layer_map) != self.student.n_layer
        ):
            raise ConfigError(
                f"student.layer_map has {len(self.student.layer_map)} entries but "
                f"student.n_layer is {self.student.n_layer}"
            )
        if self.parallel.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        if self.parallel.teacher_apart and self.parallel.tensor_parallel_size != 1:
            raise ConfigError(
                f"parallel.teacher_tensor_parallel_size={self.parallel.teacher_size} with "
                f"parallel.tensor_parallel_size={self.parallel.tensor_parallel_size}: the student "
                "is split like the teacher (equal sizes, or leave teacher_tensor_parallel_size "
                "null) or not at all (tensor_parallel_size: 1)"
            )
        if self.batch.global_batch_size % self.batch.micro_batch_size:
            raise ConfigError(
                f"batch.global_batch_size ({self.batch.global_batch_size}) must be a multiple of "
                f"batch.micro_batch_size ({self.batch.micro_batch_size})"
            )

    def _check_tensor_parallel(self) -> None:
        """Refuse, naming the key, what tensor parallelism does not combine with."""
        tp = f"parallel.tensor_parallel_size={self.parallel.tensor_parallel_size}"
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                f"deepspeed.zero_stage=3 with {tp}: the tensor-parallel layers (DeepSpeed AutoTP) "
                "combine with ZeRO stages 0-2 only; use zero_stage 1 or 2"
            )
        if not self.fused_loss:
            raise ConfigError(
                f"fused_loss=false with {tp}: under tensor parallelism the LM-head losses are "
                "the vocabulary-parallel fused ones; set fused_loss: true"
            )
