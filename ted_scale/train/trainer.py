"""The training run: the method's phases in order, each a short loop over a DeepSpeed engine.

The method (``ted_scale.distill.methods``) decides the phases and builds each one; this module only
runs them. Components own their cadence: ``StepLog`` (metrics), ``CheckpointManager``
(checkpoints), ``InTrainingEval`` (evaluation), ``NonFiniteGuard`` (the non-finite policy). Every
finished phase is recorded in ``progress.json``, so a resumed run skips it.
"""

from __future__ import annotations

import itertools
import random
import time
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ted_scale.config import ConfigError, RunConfig
from ted_scale.data.loader import DistributedBatchLoader, PackedTokens, open_split
from ted_scale.data.manifest import load_manifest
from ted_scale.data.tokenizer import tokenizer_fingerprint
from ted_scale.distill.methods import MethodContext, Phase, PlannedPhase, get_method
from ted_scale.distill.run_models import build_run_models, run_tokenizer
from ted_scale.flops import device_peak_tflops
from ted_scale.io import atomic_write_json
from ted_scale.parallel import agreed, barrier, init_parallel, teacher_dims
from ted_scale.precision import autocast, compute_dtype
from ted_scale.train.checkpoint import CheckpointManager, CheckpointTag
from ted_scale.train.engine import build_engine, deepspeed_config, gradient_accumulation_steps
from ted_scale.train.evaluation import InTrainingEval
from ted_scale.train.memory_check import check_run_fits
from ted_scale.train.metrics import MetricsWriter, StepLog, Throughput
from ted_scale.train.nonfinite import NonFiniteGuard
from ted_scale.train.prefetch import TeacherFeed
from ted_scale.train.run_dir import PROGRESS_NAME, check_shared, claim_run_dir, read_progress


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def phase_seed(seed: int, planned: PlannedPhase, plan: list[PlannedPhase]) -> int:
    """The seed a phase starts from: the run's seed, the phase's kind and its rank among the
    method's phases of that kind. A phase started again after a resume (killed before its first
    checkpoint) draws what it drew the first time, a phase run alone (``stage=distill``) draws
    what it draws inside ``stage=all``, and every method's Stage II starts from the same stream
    (the same dropout masks and draws at a seed: paired comparisons)."""
    rank = [p for p in plan if p.kind == planned.kind].index(planned)
    entropy = [seed, zlib.crc32(planned.kind.encode()), rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class Trainer:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.dims = init_parallel(
            config.parallel.tensor_parallel_size, peer_timeout_s=config.parallel.peer_timeout_s
        )
        self.device = self.dims.device
        self.main = self.dims.is_main
        self.run_dir = Path(config.output_dir)
        self.method = get_method(config.method)
        if self.dims.tp_size > 1 and not self.method.tensor_parallel:
            raise ConfigError(
                f"method={config.method} does not support tensor parallelism "
                f"({self.method.tensor_parallel_note}); use parallel.tensor_parallel_size=1"
            )
        if config.parallel.teacher_apart:
            key = f"parallel.teacher_tensor_parallel_size={config.parallel.teacher_size}"
            if not self.method.needs_teacher:
                raise ConfigError(f"{key} with method={config.method}: the method has no teacher")
            if not self.method.teacher_apart:
                raise ConfigError(
                    f"{key}: method={config.method} does not support a teacher split apart from "
                    f"its student ({self.method.teacher_apart_note}); leave it null"
                )
        self.teacher_dims = teacher_dims(self.dims, config.parallel.teacher_size)
        self.plan = [p for p in self.method.plan(config) if config.stage in ("all", p.kind)]
        if not self.plan:
            phases = ", ".join(f"{p.name} ({p.kind})" for p in self.method.plan(config))
            raise ConfigError(
                f"stage={config.stage} with method={config.method}: nothing to do "
                f"(the method's phases: {phases})"
            )
        deepspeed_config(config, self.dims.dp_size)  # batch and deepspeed.extra, checked now
        check_run_fits(
            config,
            self.device,
            tp=self.dims.tp_size,
            world=self.dims.world_size,
            seq_len=load_manifest(config.data.path).seq_len,
        )
        self._prepare_run_dir()
        seed_everything(config.seed)
        self.tokenizer = run_tokenizer(config)
        self.compute_dtype = compute_dtype(config.precision, self.device)
        self.models = build_run_models(
            config,
            needs_teacher=self.method.needs_teacher,
            model_families=self.method.model_families,
            tensor_parallel_families=self.method.tensor_parallel_families,
            device=self.device,
            compute_dtype=self.compute_dtype,
            dims=self.dims,
            teacher_dims=self.teacher_dims,
            tokenizer=self.tokenizer,
        )
        self.teacher, self.student = self.models.teacher, self.models.student
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            [p.name for p in self.plan],
            rank=self.dims.rank,
            keep=config.checkpoint.keep,
            interval=config.checkpoint.interval,
            tensor_parallel_size=self.dims.tp_size,
            data_parallel_size=self.dims.dp_size,
            zero_stage=config.deepspeed.stage_at(self.dims.dp_size),
            log=self._log_console,
        )
        self.metrics = MetricsWriter(
            self.run_dir, enabled=self.main, tensorboard=config.log.tensorboard
        )
        self.evaluator = None
        if config.eval.interval:
            heldout = self._open_split(config.data.eval_split)
            self.evaluator = InTrainingEval(config, self.tokenizer, heldout, is_main=self.main)
        self.ctx = MethodContext(
            config=config,
            teacher=self.teacher,
            student=self.student,
            layer_map=self.models.layer_map,
            device=self.device,
            compute_dtype=self.compute_dtype,
            run_dir=self.run_dir,
            tokenizer=self.tokenizer,
            is_main=self.main,
            data_rank=self.dims.dp_rank,
            data_ranks=self.dims.dp_size,
            log=self._log_console,
            batches=self._first_batches,
            dims=self.dims,
            teacher_dims=self.teacher_dims,
        )
        self.total_tokens = 0

    # ----------------------------------------------------------------------------- set-up
    def _prepare_run_dir(self) -> None:
        """Lock the run directory (one run per directory) and record this invocation's config, on
        the main rank; a refusal there (a held lock, a used directory) stops every rank, as does
        a rank that does not see the directory rank 0 writes (not on a shared filesystem)."""
        with agreed():
            if self.main:
                self.lock = claim_run_dir(self.config, self.run_dir, self._log_console)
        check_shared(self.run_dir, self.dims.rank, self.dims.world_size)

    def _mark_done(self, phase: str) -> None:
        if self.main:
            progress = read_progress(self.run_dir)
            progress["done"].append(phase)
            atomic_write_json(self.run_dir / PROGRESS_NAME, progress)
        barrier()

    def _open_split(self, split: str, samples: slice | None = None) -> PackedTokens:
        """The split, or the view of its samples ``samples``."""
        model = self.teacher or self.student
        tokens = open_split(
            self.config.data.path,
            split,
            expected_vocab_size=model.vocab_in_use or model.config.vocab_size,
            expected_tokenizer_sha256=tokenizer_fingerprint(self.tokenizer),
            max_positions=self.student.config.n_positions,
            verify_checksums=self.config.data.verify_checksums,
        )
        return tokens if samples is None else tokens.subset(samples)

    def _loader(self, split: str, samples: slice | None = None) -> DistributedBatchLoader:
        """Disjoint data per data-parallel rank; the ranks of one tensor-parallel group share it."""
        return DistributedBatchLoader(
            self._open_split(split, samples),
            self.config.batch.micro_batch_size,
            rank=self.dims.dp_rank,
            world_size=self.dims.dp_size,
            seed=self.config.seed,
        )

    def _first_batches(
        self, split: str, n: int, samples: slice | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` micro-batches of ``split`` (or of its samples ``samples``) in the run's
        seeded order, one rank's view: the same on every rank, whatever the world size."""
        loader = DistributedBatchLoader(
            self._open_split(split, samples),
            self.config.batch.micro_batch_size,
            seed=self.config.seed,
            drop_last=False,
            pin_memory=False,
        )
        return list(itertools.islice(loader, n))

    def _prefetch(self) -> bool:
        """``auto`` prefetches on CUDA; ``on`` without CUDA keeps the look-ahead order inline."""
        setting = self.config.teacher_prefetch
        return setting == "on" or (setting == "auto" and self.device.type == "cuda")

    # ----------------------------------------------------------------------------- phases
    def run(self) -> None:
        start = time.perf_counter()
        done = set(read_progress(self.run_dir)["done"])
        resume_tag = self.checkpoints.resolve(self.config.resume)
        if resume_tag is not None:  # the plan runs in order: a checkpoint's earlier phases finished
            done.update(p.name for p in self.plan[: resume_tag.phase_index])
        teacher = ""
        if self.teacher_dims is not self.dims:
            teacher = f" (teacher: tp={self.teacher_dims.tp_size}, its own groups)"
        self._log_console(
            f"{self.config.method}: phases {', '.join(p.name for p in self.plan)}; "
            f"{self.dims.layout}{teacher} on {self.device.type}"
        )
        for planned in self.plan:
            if planned.name in done:
                self._log_console(f"{planned.name}: already finished in {self.run_dir}, skipping")
                continue
            seed_everything(phase_seed(self.config.seed, planned, self.method.plan(self.config)))
            phase = self.method.build(planned.name, self.ctx)
            tag = resume_tag if resume_tag is not None and resume_tag.phase == phase.name else None
            if phase.trained is not None:  # a phase without training does its work in finish
                self.train_phase(phase, tag)
            phase.finish()
            self._mark_done(phase.name)
        wall = time.perf_counter() - start
        self._log_console(
            f"done in {wall:.1f} s: {self.total_tokens:,} tokens, "
            f"{self.total_tokens / max(wall, 1e-9):,.0f} tokens/s overall; outputs in {self.run_dir}"
        )
        self.metrics.close()
        if self.main:
            self.lock.release()

    # ----------------------------------------------------------------------------- the loop
    def train_phase(self, phase: Phase, tag: CheckpointTag | None) -> None:
        config = self.config
        loader = self._loader(config.data.train_split, phase.train_samples)
        accum = gradient_accumulation_steps(config, self.dims.dp_size)
        schedule = phase.schedule
        total_steps = schedule.max_steps or max(
            1, int(schedule.epochs * loader.batches_per_epoch // accum)
        )
        if tag is not None and tag.step > total_steps:
            # The config section this schedule is (methods pick theirs): named in the message.
            key = next(
                (f.name for f in fields(config) if getattr(config, f.name) is schedule), None
            )
            knob = f"{key}.max_steps / {key}.epochs" if key else "the phase's max_steps / epochs"
            raise ConfigError(
                f"{phase.name}: the checkpoint {self.checkpoints.root / tag.name} is at step "
                f"{tag.step} but this run gives the phase {total_steps} steps ({knob} lowered "
                f"since): a resume cannot go back; set the budget to at least {tag.step}, or "
                "start a new output_dir"
            )
        engine, scheduler = build_engine(
            phase.trained,
            config,
            self.dims,
            total_steps=total_steps,
            lr=schedule.lr or config.optim.lr,
        )
        step = 0
        if tag is not None:
            client = self.checkpoints.load(engine, tag)
            loader.load_state_dict(client["loader"])
            step = client["step"]
            self.total_tokens = client.get("total_tokens", 0)
            if phase.batch_draw is not None:
                phase.batch_draw.load_state_dict(client["batch_draw"])
            self._log_console(
                f"{phase.name}: resumed from {self.checkpoints.root / tag.name} at step {step}"
            )
        self.metrics.truncate_after(phase.name, step)  # step 0: lines of a run killed before
        if phase.batch_draw is not None:
            phase.batch_draw.start(total_steps)
        seq_len = loader.dataset.seq_len
        tokens_per_step = config.batch.global_batch_size * seq_len
        feed = TeacherFeed(
            loader,
            phase.tapper,
            self.device,
            prefetch=self._prefetch(),
            batch_draw=phase.batch_draw,
        )
        guard = NonFiniteGuard(
            engine, limit=config.skip_nonfinite, group=self.dims.dp_group, log=self._log_console
        )
        log = StepLog(
            self.metrics,
            phase.name,
            interval=config.log.interval,
            total_steps=total_steps,
            start_step=step,
            throughput=Throughput(
                phase.flops_per_token(seq_len),
                self.dims.dp_size,
                device_peak_tflops(self.device),
            ),
            group=self.dims.dp_group,
            show_bar=self.main and config.log.progress_bar,
        )
        self._log_console(
            f"{phase.name}: {total_steps} steps of {config.batch.global_batch_size} sequences "
            f"({accum} accumulation x {config.batch.micro_batch_size} x {self.dims.dp_size} "
            f"data-parallel ranks), {loader.batches_per_epoch} micro-batches per rank per epoch"
        )

        def extras() -> dict[str, float]:  # read only on the steps that write a metrics line
            return {
                "lr": scheduler.get_last_lr()[0],
                "skipped_steps": guard.skipped,
                **feed.timing(),
            }

        while step < total_steps:
            self._train_step(engine, feed, accum, step + 1, guard, log)
            step += 1
            self.total_tokens += tokens_per_step
            if log.due(step):  # the host reads the losses here anyway
                guard.verify(step, self._last_checkpoint)
            log.step_done(step, tokens_per_step, extras)
            # A checkpoint first, so that a failing evaluation loses nothing; never one of a step
            # whose loss was not finite.
            if self.checkpoints.due(step, total_steps) and guard.saves(step, self._last_checkpoint):
                client = {
                    "step": step,
                    "phase": phase.name,
                    "loader": feed.consumed_state(),
                    "total_tokens": self.total_tokens,
                    "batch_draw": feed.consumed_draw_state(),
                }
                self.checkpoints.save(engine, self.checkpoints.tag(phase.name, step), client)
            if self.evaluator and phase.evaluated is not None and self.evaluator.due(step):
                self._evaluate(phase, step)
        log.close()

    def _train_step(
        self, engine, feed: TeacherFeed, accum: int, step: int, guard: NonFiniteGuard, log: StepLog
    ) -> None:
        """One optimizer step: ``accum`` micro-batches forward and backward, then the update."""
        step_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            item = feed.next()
            with autocast(self.device, self.compute_dtype):
                loss, parts = engine(item.input_ids, item.labels, item.tapped, **item.draw)
            engine.backward(loss)
            parts["loss"] = loss.detach()
            log.add(parts)
            step_loss += loss.detach()
            if micro == accum - 1:
                guard.check(step_loss, step, parts, self._last_checkpoint)
            engine.step()

    def _last_checkpoint(self) -> Path | None:
        tag = self.checkpoints.latest()
        return None if tag is None else self.checkpoints.root / tag.name

    def _evaluate(self, phase: Phase, step: int) -> None:
        results = self.evaluator(phase.evaluated, self.device)
        if results:
            self.metrics.write({"step": step, "stage": phase.name, **results})
            self._log_console(
                f"{phase.name} step {step}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in results.items())
            )

    def _log_console(self, message: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(f"[ted_scale] {message}")


def train(config: RunConfig) -> Path:
    """Run ``config`` to the end; returns the run directory."""
    trainer = Trainer(config)
    trainer.run()
    return trainer.run_dir
