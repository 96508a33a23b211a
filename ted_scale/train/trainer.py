"""The training run: Stage I filters, Stage II distillation (TED, TED-KL, KD, LWD), or plain LM
training, on a DeepSpeed engine, with checkpoints, resume, metrics and the final HF export.

A run goes through its phases in order (``stage1_teacher``, ``stage1_student``, ``stage2`` or
``lm``); each finished phase is recorded in ``progress.json`` so a resumed run skips it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ted_scale.config import ConfigError, RunConfig
from ted_scale.config.schema import ScheduleConfig
from ted_scale.data.loader import DistributedBatchLoader, PackedTokens, open_split
from ted_scale.data.tokenizer import tokenizer_fingerprint
from ted_scale.distill.filter_io import (
    FilterRecord,
    check_record,
    load_filters_into,
    read_record,
    save_filters,
)
from ted_scale.distill.filters import (
    BlockFilter,
    FilterBank,
    LinearFilter,
    MLPFilter,
    build_filters,
)
from ted_scale.distill.modules import FilterTraining, FrozenTapper, StudentDistillation
from ted_scale.io import atomic_write_json
from ted_scale.model import GPT, export_hf
from ted_scale.train import flops
from ted_scale.train.checkpoint import CheckpointManager, CheckpointTag
from ted_scale.train.distributed import DistInfo, barrier, gathered_state, init_distributed
from ted_scale.train.engine import (
    autocast_dtype,
    build_engine,
    deepspeed_config,
    gradient_accumulation_steps,
)
from ted_scale.train.evaluation import InTrainingEval
from ted_scale.train.metrics import LossAverager, MetricsWriter, Throughput, progress_bar
from ted_scale.train.models import (
    ModelMismatchError,
    build_student,
    build_teacher,
    check_compatible,
    run_tokenizer,
    teacher_layer_map,
    weights_fingerprint,
)
from ted_scale.train.prefetch import TeacherFeed
from ted_scale.train.run_dir import claim_run_dir


class NonFiniteLossError(RuntimeError):
    """The loss stopped being a finite number."""


@dataclass
class Phase:
    name: str
    module: torch.nn.Module  # the trained side: what the DeepSpeed engine wraps
    tapper: FrozenTapper | None  # the frozen side (None for plain LM training)
    schedule: ScheduleConfig
    flops_per_token: Callable[[int], float]  # seq_len -> FLOPs per token of one step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.dist: DistInfo = init_distributed()
        self.run_dir = Path(config.output_dir)
        self.main = self.dist.is_main
        deepspeed_config(config, self.dist.world_size)  # batch and deepspeed.extra, checked now
        self._prepare_run_dir()
        seed_everything(config.seed)
        self.tokenizer = run_tokenizer(config)
        self.needs_teacher = config.stage != "lm"
        self.teacher = build_teacher(config) if self.needs_teacher else None
        self.student = build_student(config, self.teacher)
        check_compatible(config, self.tokenizer, self.teacher, self.student)
        self.layer_map = teacher_layer_map(config, self.teacher) if self.teacher else []
        self.autocast = autocast_dtype(config, self.dist.device)
        if self.teacher is not None:
            self.teacher.to(self.dist.device, dtype=self.autocast or torch.float32)
        self.fused = config.fused_loss
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            rank=self.dist.rank,
            keep=config.checkpoint.keep,
            log=self._log_console,
        )
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.main, tensorboard=config.log.tensorboard
        )
        self.peak_tflops = flops.device_peak_tflops(self.dist.device)
        self.total_tokens = 0
        self.evaluator: InTrainingEval | None = None

    # ----------------------------------------------------------------------------- set-up
    def _prepare_run_dir(self) -> None:
        if self.main:
            self.lock = claim_run_dir(self.config, self.run_dir, self._log_console)
        barrier()

    def _progress(self) -> dict[str, Any]:
        path = self.run_dir / "progress.json"
        return json.loads(path.read_text()) if path.exists() else {"done": []}

    def _mark_done(self, phase: str) -> None:
        if self.main:
            progress = self._progress()
            progress["done"].append(phase)
            atomic_write_json(self.run_dir / "progress.json", progress)
        barrier()

    def _open_split(self, split: str) -> PackedTokens:
        model = self.teacher or self.student
        return open_split(
            self.config.data.path,
            split,
            expected_vocab_size=model.config.vocab_size,
            expected_tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            max_positions=self.student.config.n_positions,
            verify_checksums=self.config.data.verify_checksums,
        )

    def _loader(self, split: str) -> DistributedBatchLoader:
        return DistributedBatchLoader(
            self._open_split(split),
            self.config.batch.micro_batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=self.config.seed,
        )

    # ----------------------------------------------------------------------------- phases
    def run(self) -> None:
        config = self.config
        start = time.perf_counter()
        done = set(self._progress()["done"])
        resume_tag = self.checkpoints.resolve(config.resume)
        if config.stage == "lm":
            plan = ["lm"]
        else:
            uses_filters = config.method in ("ted", "ted_kl")
            plan = []
            if config.stage in ("filters", "all") and uses_filters:
                plan.append("stage1_teacher")
                if config.filters.student_filters == "train":
                    plan.append("stage1_student")
            if config.stage in ("distill", "all"):
                plan.append("stage2")
            if not plan:
                raise ConfigError(
                    f"stage={config.stage} with method={config.method}: nothing to do "
                    "(only ted and ted_kl have a Stage I)"
                )
        for name in plan:
            if name in done:
                self._log_console(f"{name}: already finished in {self.run_dir}, skipping")
                continue
            tag = resume_tag if resume_tag is not None and resume_tag.phase == name else None
            getattr(self, f"_run_{name}")(tag)
        wall = time.perf_counter() - start
        self._log_console(
            f"done in {wall:.1f} s: {self.total_tokens:,} tokens, "
            f"{self.total_tokens / max(wall, 1e-9):,.0f} tokens/s overall; outputs in {self.run_dir}"
        )
        self.metrics.close()
        if self.main:
            self.lock.release()

    def _filter_record(self, d_in: int) -> FilterRecord:
        return FilterRecord(
            teacher=self.config.teacher.pretrained or "random",
            teacher_fingerprint=weights_fingerprint(self.teacher),
            layer_map=self.layer_map,
            arch=self.config.filters.arch,
            d_in=d_in,
            d_out=self.teacher.config.n_embd,
        )

    def _new_filters(
        self, model: GPT, layers: list[int], *, random_init: bool = False
    ) -> FilterBank:
        return build_filters(
            self.config.filters.arch,
            model,
            layers,
            d_out=self.teacher.config.n_embd,
            mlp_hidden=self.config.filters.mlp_hidden,
            random_init=random_init,
        ).to(self.dist.device, dtype=torch.float32)  # block filters copy a bf16 teacher's blocks

    def _stage1_phase(self, name: str, model: GPT, layers: list[int]) -> tuple[Phase, FilterBank]:
        bank = self._new_filters(model, layers)
        shapes = [_filter_shape(f) for f in bank.filters]

        def step_flops(seq_len: int) -> float:
            return flops.stage1_flops(
                seq_len=seq_len,
                vocab=model.config.vocab_size,
                model=(model.config.n_layer, model.config.n_embd),
                filters=shapes,
                top_layer=max(layers),
            ).total

        module = FilterTraining(bank, model, fused=self.fused, compute_dtype=self.autocast)
        tapper = FrozenTapper(model, layers, mode="raw")
        return Phase(name, module, tapper, self.config.stage1, step_flops), bank

    def _run_stage1_teacher(self, tag: CheckpointTag | None) -> None:
        phase, bank = self._stage1_phase("stage1_teacher", self.teacher, self.layer_map)
        self._train(phase, tag)
        self._save_filters({"teacher": bank}, d_in=self.teacher.config.n_embd)
        self._mark_done("stage1_teacher")

    def _run_stage1_student(self, tag: CheckpointTag | None) -> None:
        frozen = build_student(self.config, self.teacher).to(self.dist.device)
        frozen.load_state_dict(self.student.state_dict())
        phase, bank = self._stage1_phase(
            "stage1_student", frozen, list(range(frozen.config.n_layer))
        )
        self._train(phase, tag)
        filters_dir = self.run_dir / "filters"
        banks = {"teacher": self._load_teacher_filters(filters_dir), "student": bank}
        self._save_filters(banks, d_in=self.teacher.config.n_embd)
        self._mark_done("stage1_student")

    def _save_filters(self, banks: dict[str, FilterBank], *, d_in: int) -> None:
        states = {name: gathered_state(bank) for name, bank in banks.items()}
        if self.main:
            save_filters(states, self._filter_record(d_in), self.run_dir / "filters")
            self._log_console(f"filters saved to {self.run_dir / 'filters'}")
        barrier()

    def _load_teacher_filters(self, filters_dir: Path) -> FilterBank:
        bank = self._new_filters(self.teacher, self.layer_map)
        check_record(
            read_record(filters_dir), self._filter_record(self.teacher.config.n_embd), filters_dir
        )
        load_filters_into(bank, filters_dir, "teacher")
        return bank.to(dtype=self.autocast or torch.float32)

    def _student_filters(self, teacher_filters: FilterBank, filters_dir: Path) -> FilterBank:
        layers = list(range(self.student.config.n_layer))
        mode = self.config.filters.student_filters
        if mode in ("copy", "train") and self.student.config.n_embd != self.teacher.config.n_embd:
            raise ModelMismatchError(
                f"filters.student_filters={mode} needs the student width "
                f"({self.student.config.n_embd}) to equal the teacher's ({self.teacher.config.n_embd})"
            )
        if mode == "copy":
            # Filter k is the teacher's filter at M(k), structure and all (a block filter keeps
            # the teacher's later blocks, however many the student has after block k).
            bank = copy.deepcopy(teacher_filters)
            bank.layers = layers
        else:
            bank = self._new_filters(self.student, layers, random_init=mode == "random")
            if mode == "train":
                load_filters_into(bank, filters_dir, "student")
        return bank.float().requires_grad_(True).train()

    def _run_stage2(self, tag: CheckpointTag | None) -> None:
        config = self.config
        method = config.method
        layers = list(range(self.student.config.n_layer))
        d_t, d_s = self.teacher.config.n_embd, self.student.config.n_embd
        alpha_kd = config.distill.alpha_kd
        teacher_filters = layer_modules = None
        if method in ("ted", "ted_kl"):
            filters_dir = Path(config.filters_from or self.run_dir / "filters")
            teacher_filters = self._load_teacher_filters(filters_dir)
            layer_modules = self._student_filters(teacher_filters, filters_dir)
        elif method == "lwd":
            projections = [torch.nn.Linear(d_s, d_t) for _ in layers]
            layer_modules = FilterBank(projections, layers).to(self.dist.device)
        mode = {"ted": "filtered", "ted_kl": "filtered_normed"}.get(method, "raw")
        tapper = FrozenTapper(
            self.teacher,
            self.layer_map if method != "kd" else [],
            filters=teacher_filters,
            mode=mode,
            with_top=alpha_kd > 0,
        )
        module = StudentDistillation(
            self.student.to(self.dist.device),
            method,
            layer_modules=layer_modules,
            alpha_kd=alpha_kd,
            alpha_layer=config.distill.alpha_layer if method != "kd" else 0.0,
            temperature=config.distill.temperature,
            layer_reduction=config.distill.layer_reduction,
            fused=self.fused,
            compute_dtype=self.autocast,
        )

        s_shapes = (
            [] if layer_modules is None else [_filter_shape(f) for f in layer_modules.filters]
        )
        t_shapes = (
            [] if teacher_filters is None else [_filter_shape(f) for f in teacher_filters.filters]
        )

        def step_flops(seq_len: int) -> float:
            return flops.step_flops(
                method=method,
                seq_len=seq_len,
                vocab=self.student.config.vocab_size,
                student=(self.student.config.n_layer, d_s),
                teacher=(self.teacher.config.n_layer, d_t),
                teacher_filters=t_shapes,
                student_filters=s_shapes,
                kd=alpha_kd > 0,
            ).total

        self._train(Phase("stage2", module, tapper, config.stage2, step_flops), tag)
        self._export_student()
        self._mark_done("stage2")

    def _run_lm(self, tag: CheckpointTag | None) -> None:
        module = StudentDistillation(
            self.student.to(self.dist.device), "lm", fused=self.fused, compute_dtype=self.autocast
        )

        c = self.student.config

        def step_flops(seq_len: int) -> float:
            return flops.step_flops(
                method="lm", seq_len=seq_len, vocab=c.vocab_size, student=(c.n_layer, c.n_embd)
            ).total

        self._train(Phase("lm", module, None, self.config.stage2, step_flops), tag)
        self._export_student()
        self._mark_done("lm")

    def _export_student(self) -> None:
        state = gathered_state(self.student)
        if self.main:
            student = GPT(self.student.config)
            student.load_state_dict(state)
            path = export_hf(student, self.run_dir / "student_hf", self.tokenizer)
            self._log_console(f"student exported to {path}")
        barrier()

    # ----------------------------------------------------------------------------- the loop
    def _train(self, phase: Phase, tag: CheckpointTag | None) -> None:
        config = self.config
        loader = self._loader(config.data.train_split)
        accum = gradient_accumulation_steps(config, self.dist.world_size)
        schedule = phase.schedule
        total_steps = schedule.max_steps or max(
            1, int(schedule.epochs * loader.batches_per_epoch // accum)
        )
        engine, scheduler = build_engine(
            phase.module,
            config,
            world_size=self.dist.world_size,
            total_steps=total_steps,
            lr=schedule.lr or config.optim.lr,
        )
        step = 0
        if tag is not None:
            client = self.checkpoints.load(engine, tag)
            loader.load_state_dict(client["loader"])
            step = client["step"]
            self.total_tokens = client.get("total_tokens", 0)
            self._log_console(
                f"{phase.name}: resumed from {self.checkpoints.root / tag.name} at step {step}"
            )
        self.metrics.truncate_after(phase.name, step)  # step 0: lines of a run killed before
        tokens_per_step = config.batch.global_batch_size * loader.dataset.seq_len
        throughput = Throughput(
            phase.flops_per_token(loader.dataset.seq_len), self.dist.world_size, self.peak_tflops
        )
        averager = LossAverager()
        feed = TeacherFeed(loader, phase.tapper, self.dist.device, prefetch=self._prefetch())
        skipped = 0
        last_good = self.checkpoints.latest()
        self._log_console(
            f"{phase.name}: {total_steps} steps of {config.batch.global_batch_size} sequences "
            f"({accum} accumulation x {config.batch.micro_batch_size} x {self.dist.world_size} ranks), "
            f"{loader.batches_per_epoch} micro-batches per rank per epoch"
        )
        bar = progress_bar(
            total_steps, step, phase.name, enabled=self.main and config.log.progress_bar
        )
        while step < total_steps:
            step_loss = torch.zeros((), device=self.dist.device)
            for micro in range(accum):
                item = feed.next()
                with self._autocast():
                    loss, parts = engine(item.input_ids, item.labels, item.tapped)
                engine.backward(loss)
                parts["loss"] = loss.detach()
                averager.add(parts)
                step_loss += loss.detach()
                if micro == accum - 1:
                    skipped += self._check_finite(
                        step_loss, step, parts, skipped, last_good, engine
                    )
                engine.step()
            step += 1
            self.total_tokens += tokens_per_step
            throughput.add_tokens(tokens_per_step)
            bar.update(1)
            if step % config.log.interval == 0 or step == total_steps:
                record = {"step": step, "stage": phase.name, **averager.pop()}
                record.update(lr=scheduler.get_last_lr()[0], **throughput.pop())
                record["skipped_steps"] = skipped
                record.update(feed.timing())
                self.metrics.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}"
                )
            if (
                config.eval.interval
                and step % config.eval.interval == 0
                and phase.name in ("stage2", "lm")
            ):
                self._evaluate_in_training(phase.name, step)
            at_interval = config.checkpoint.interval and step % config.checkpoint.interval == 0
            if at_interval or step == total_steps:
                client = {
                    "step": step,
                    "phase": phase.name,
                    "loader": feed.consumed_state(),
                    "total_tokens": self.total_tokens,
                }
                last_good = CheckpointTag.of(phase.name, step)
                self.checkpoints.save(engine, last_good, client)
        bar.close()

    def _check_finite(self, step_loss, step, parts, skipped, last_good, engine) -> int:
        """One host sync per optimizer step: stop (or count a skip) on a non-finite loss.

        Under ZeRO >= 1 DeepSpeed's overflow check drops a step whose gradients are not finite;
        under ZeRO 0 the gradients are dropped here, so the optimizer leaves every weight alone.
        """
        bad = (~torch.isfinite(step_loss)).float()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            return 0
        if skipped < self.config.skip_nonfinite:
            if self.config.deepspeed.zero_stage == 0:
                for p in engine.module.parameters():
                    p.grad = None
            self._log_console(
                f"step {step + 1}: non-finite loss, step skipped ({skipped + 1} so far)"
            )
            return 1
        values = {k: float(v) for k, v in parts.items()}
        where = self.checkpoints.root / last_good.name if last_good else "none (no checkpoint yet)"
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1}: {values}; last good checkpoint: {where}"
        )

    def _prefetch(self) -> bool:
        """``auto`` prefetches on CUDA; ``on`` without CUDA keeps the look-ahead order inline."""
        setting = self.config.teacher_prefetch
        return setting == "on" or (setting == "auto" and self.dist.device.type == "cuda")

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast)

    def _evaluate_in_training(self, phase: str, step: int) -> None:
        if self.evaluator is None:
            heldout = self._open_split(self.config.data.eval_split)
            self.evaluator = InTrainingEval(self.config, self.tokenizer, heldout, is_main=self.main)
        results = self.evaluator(self.student, self.dist.device)
        if results:
            self.metrics.write({"step": step, "stage": phase, **results})
            self._log_console(
                f"{phase} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items())
            )

    def _log_console(self, message: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(f"[ted_scale] {message}")


def _filter_shape(module: torch.nn.Module) -> flops.FilterShape:
    """The FLOP-relevant shape of one filter (or LWD projection)."""
    if isinstance(module, BlockFilter):
        d = module.blocks[0].ln_1.normalized_shape[0] if len(module.blocks) else 0
        return flops.FilterShape("blocks", d, d, n_blocks=len(module.blocks))
    if isinstance(module, MLPFilter):
        up, down = module.up_proj, module.down_proj
        return flops.FilterShape("mlp", up.in_features, down.out_features, hidden=up.out_features)
    linear = module.proj if isinstance(module, LinearFilter) else module
    return flops.FilterShape("linear", linear.in_features, linear.out_features)


def train(config: RunConfig) -> Path:
    """Run ``config`` to the end; returns the run directory."""
    trainer = Trainer(config)
    trainer.run()
    return trainer.run_dir
