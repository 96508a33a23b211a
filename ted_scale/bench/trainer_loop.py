"""The trainer's own loop, timed: what ``launch/pretrain_ted.py`` achieves per step.

``bench_throughput.py --engine`` runs, beside each configuration's plain step, the real trainer on
the same configuration (``bench_config``): DeepSpeed engine at the config's ZeRO stage, the
memory-mapped loader on a prepared synthetic shard set, the trainer's metrics, on one rank or
data-parallel over the ranks it is launched with (``--dp N``). The
synthetic set is made by ``prepare`` itself from random words over a word-level tokenizer with the
preset's vocabulary, so every piece of the data path is the real one. Tokens/s is that of the
fastest logged step after the warm-up, as the plain step's is its fastest step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ted_scale.bench.presets import Preset, Spec, bench_config
from ted_scale.config.parse import dump_yaml
from ted_scale.config.schema import ScheduleConfig
from ted_scale.data.prepare import PrepareConfig, prepare
from ted_scale.data.tokenizer import EOS_TOKEN
from ted_scale.parallel import ParallelDims
from ted_scale.parallel.agree import agreed

WORDS_PER_DOC = 200


def synthetic_dataset(
    vocab: int, seq_len: int, num_tokens: int, out: Path, *, seed: int = 0
) -> Path:
    """A prepared data directory of about ``num_tokens`` random tokens, ``vocab`` ids in all."""
    words = [EOS_TOKEN] + [f"w{i}" for i in range(vocab - 1)]
    tokenizer = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=EOS_TOKEN)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer_dir = out / "word_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN).save_pretrained(
        tokenizer_dir
    )
    rng = random.Random(seed)
    corpus = out / "corpus.txt"
    n_docs = max(2, num_tokens // WORDS_PER_DOC + 1)
    corpus.write_text(
        "\n".join(
            " ".join(words[rng.randrange(1, vocab)] for _ in range(WORDS_PER_DOC))
            for _ in range(n_docs)
        )
        + "\n"
    )
    data = out / "data"
    prepare(
        PrepareConfig(
            input=str(corpus),
            out=str(data),
            tokenizer=str(tokenizer_dir),
            seq_len=seq_len,
            test_fraction=0.0,  # the benchmark evaluates nothing
            num_workers=0,
            one_doc_per_line=True,
            verbose=False,
        )
    )
    return data


def measure_engine(
    preset: Preset,
    spec: Spec,
    *,
    zero_stage: int | None = None,
    dims: ParallelDims | None = None,
) -> dict:
    """Run the trainer on ``spec``'s configuration; every phase gets the preset's warm-up + timed
    steps (so the benchmarked phase, ``Method.benchmarked``, does; the others only set it up).
    ``zero_stage``: ``deepspeed.zero_stage`` (None: the run default for the data-parallel size).
    ``dims``: the data-parallel ranks of this process group to run it over, each with its own
    micro-batch (a collective; one node: rank 0 writes the data set to a folder they all read);
    default: this one rank. Tokens/s counts every rank's tokens."""
    from ted_scale.distill.methods import get_method, load_run_config
    from ted_scale.train.trainer import Trainer

    dp = 1 if dims is None else dims.dp_size
    steps = preset.warmup + preset.steps
    with _shared_folder(dims) as tmp:
        config_file, run = tmp / "config.yaml", tmp / "run"
        with agreed():  # a failure on rank 0 reaches every rank, not a hang in its barrier
            if dims is None or dims.is_main:
                tokens = (steps + 4) * dp * preset.micro_batch * (preset.seq_len + 1) * 4
                data = synthetic_dataset(preset.vocab, preset.seq_len, tokens, tmp)
                config = bench_config(preset, spec)
                for schedule in _schedules(config):
                    schedule.max_steps = steps
                config.data.path = str(data)
                config.batch.global_batch_size = dp * preset.micro_batch
                config_file.write_text(dump_yaml(config))
        overrides = [
            f"output_dir={run}", f"teacher_prefetch={'on' if spec.prefetch else 'off'}",
            f"deepspeed.zero_stage={'null' if zero_stage is None else zero_stage}",
            "log.interval=1", "log.tensorboard=false",
            "log.progress_bar=false", "checkpoint.interval=0", "eval.interval=0",
        ]  # fmt: skip
        config = load_run_config(config_file, overrides)
        Trainer(config).run()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    phase = get_method(spec.method).benchmarked(config)
    rates = [r["tokens_per_s"] for r in records if r["stage"] == phase][preset.warmup :]
    return {
        "engine_tokens_per_s": max(rates),
        "engine_tokens_per_s_all": rates,
        "zero_stage": config.deepspeed.stage_at(dp),
    }


@contextlib.contextmanager
def _shared_folder(dims: ParallelDims | None) -> Iterator[Path]:
    """A temporary folder: rank 0's, named to the others, removed once every rank is done."""
    if dims is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    name = [tempfile.mkdtemp(prefix="ted_scale_engine_") if dims.is_main else None]
    dist.broadcast_object_list(name, src=0)
    try:
        yield Path(name[0])
    finally:
        dist.barrier()
        if dims.is_main:
            shutil.rmtree(name[0], ignore_errors=True)


def _schedules(config) -> list[ScheduleConfig]:
    """Every phase schedule of a run configuration, the methods' own sections included."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, ScheduleConfig):
            found.append(value)
        elif dataclasses.is_dataclass(value):
            found += _schedules(value)
    return found
