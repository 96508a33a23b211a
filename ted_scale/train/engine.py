"""The DeepSpeed engine around a phase's trained module, told the run's data-parallel group."""

from __future__ import annotations

from typing import Any

from torch import nn

from ted_scale.config import ConfigError
from ted_scale.config.schema import RunConfig
from ted_scale.model import GPT
from ted_scale.parallel import ParallelDims
from ted_scale.train.optim import build_optimizer, warmup_linear_decay


def gradient_accumulation_steps(config: RunConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each rank; ``global_batch_size`` counts the sequences of
    all data-parallel ranks (tensor-parallel ranks share theirs)."""
    per_step = config.batch.micro_batch_size * dp_size
    if config.batch.global_batch_size % per_step:
        raise ConfigError(
            f"batch.global_batch_size ({config.batch.global_batch_size}) must be a multiple of "
            f"batch.micro_batch_size x data-parallel ranks = {config.batch.micro_batch_size} x "
            f"{dp_size}"
        )
    return config.batch.global_batch_size // per_step


def deepspeed_config(config: RunConfig, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config. Precision is handled by torch.autocast around the forward, so
    DeepSpeed keeps fp32 master weights and its own fp16/bf16 modes stay off."""
    stage = config.deepspeed.stage_at(dp_size)
    zero: dict[str, Any] = {"stage": stage}
    if config.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Gather weights as needed; the tied LM head is registered as an external parameter.
        zero["stage3_param_persistence_threshold"] = 0
    ds = {
        "train_batch_size": config.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, dp_size),
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        # The client optimizer is torch's AdamW with a step that can be dropped (SkippableAdamW);
        # DeepSpeed's ZeRO only knows the exact class.
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.offload_optimizer:
        # The client optimizer is torch's AdamW; it steps the offloaded fp32 states on the CPU.
        ds["zero_force_ds_cpu_optimizer"] = False
    managed = {k: ds[k] for k in _BATCH_KEYS}
    ds.update(config.deepspeed.extra)
    _check_extra(config.deepspeed.extra, managed, ds)
    return ds


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _check_extra(extra: dict[str, Any], managed: dict[str, Any], ds: dict[str, Any]) -> None:
    """Refuse ``deepspeed.extra`` values as ConfigErrors naming the key, before DeepSpeed asserts."""
    for key, ours in managed.items():
        if key in extra and extra[key] != ours:
            raise ConfigError(
                f"deepspeed.extra.{key}={extra[key]!r} contradicts the batch keys ({key} = {ours} "
                "from batch.global_batch_size, batch.micro_batch_size and the rank count): "
                "set batch.* instead"
            )
    for key in ("fp16", "bf16"):
        if isinstance(extra.get(key), dict) and extra[key].get("enabled"):
            raise ConfigError(
                f"deepspeed.extra.{key}.enabled: precision is set by the `precision` key "
                "(torch.autocast with fp32 master weights); DeepSpeed's own mode is not supported"
            )
    if not extra:
        return
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(ds)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"deepspeed.extra: DeepSpeed rejects the config: {reason}") from None


def build_engine(
    module: nn.Module, config: RunConfig, dims: ParallelDims, *, total_steps: int, lr: float
):
    """Wrap ``module`` in a DeepSpeed engine with AdamW and the warm-up/decay schedule."""
    import deepspeed

    if config.deepspeed.stage_at(dims.dp_size) == 3:
        # A trained model's LM head (tied: the embedding's weight) is used outside its module's
        # forward: ZeRO-3 must gather it for the whole forward of the top module.
        for model in module.modules():
            if isinstance(model, GPT):
                deepspeed.zero.register_external_parameter(module, model.lm_head_weight)
    optimizer = build_optimizer(module, config.optim, lr)
    scheduler = warmup_linear_decay(
        optimizer,
        total_steps=total_steps,
        warmup_ratio=config.optim.warmup_ratio,
        min_lr_ratio=config.optim.min_lr_ratio,
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, dims.dp_size),
        mpu=dims.deepspeed_mpu(),
    )
    if dims.dp_size == 1 and config.deepspeed.stage_at(dims.dp_size) == 0:
        # Without ZeRO, DeepSpeed all-reduces the gradients after each backward by flattening
        # and copying them all, also over one data-parallel rank, where the mean is the identity.
        engine.enable_backward_allreduce = False
    return engine, scheduler
