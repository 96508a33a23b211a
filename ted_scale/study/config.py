"""The study's configuration: corpus, teacher, students, rows, sweep and evaluation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ted_scale.config.parse import ConfigError, bounded, load_config

BASELINE = "alone"  # the row of the student trained with next-token CE only


@dataclass
class CorpusConfig:
    path: str = "bundled:austen-novels.jsonl.gz"
    """A .txt/.jsonl file for `prepare_data.py`, or `bundled:NAME` for a file in ted_scale/assets."""
    vocab_size: int = bounded(4096, ge=257)
    """Byte-level BPE trained on the corpus's train documents."""
    seq_len: int = bounded(128, ge=8)
    test_fraction: float = bounded(0.05, gt=0.0, lt=1.0)
    """Share of documents (chapters) held out: the in-domain held-out perplexity."""


@dataclass
class SweepPoint:
    name: str
    """Row label, e.g. `ted alpha_layer=0.03`."""
    method: str = "ted"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted run-config keys -> values, applied over the student config."""


@dataclass
class StudyEvalConfig:
    wikitext_source: Literal["auto", "hf", "bundled"] = "auto"
    wikitext_articles: int | None = bounded(None, ge=1)
    """Score only the first N WikiText-2 test articles (null: all 62)."""
    lambada: Literal["auto", "always", "never"] = "auto"
    """`auto`: score the teacher first and keep LAMBADA only if its accuracy reaches
    `lambada_min_accuracy` (a column of near-zero accuracies tells nothing)."""
    lambada_min_accuracy: float = bounded(0.01, ge=0.0, le=1.0)
    lambada_examples: int | None = bounded(500, ge=1)
    """LAMBADA passages scored (the first N; null: all 5,153)."""
    batch_size: int = bounded(16, ge=1)


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    workers: int = bounded(2, ge=1)
    """Runs trained at once; each gets cpu_count // workers threads."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: dict[str, Any] = field(default_factory=dict)
    """Run-config keys of the teacher's `stage: lm` pre-training (arch, steps, optimizer, eval)."""
    student: dict[str, Any] = field(default_factory=dict)
    """Run-config keys every student row shares (depth, Stage I/II steps, optimizer, losses)."""
    methods: list[str] = field(default_factory=lambda: ["kd", "lwd", "ted", "ted_kl"])
    """Distillation rows after the CE-only baseline; a name the trainer does not accept becomes a
    "not yet implemented" row."""
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, dotted run-config keys -> values (applied to its row and its sweep points)."""
    sweep: list[SweepPoint] = field(default_factory=list)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)

    def __post_init__(self) -> None:
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and at least one, got {self.seeds}")
        names = [BASELINE, *self.methods, *(p.name for p in self.sweep)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"row names must be unique; repeated: {dupes}")
        if "ted" not in self.methods:
            raise ConfigError("methods must include 'ted' (every row is compared with it)")


def load_study_config(path: str | os.PathLike, overrides: list[str] = ()) -> StudyConfig:
    """The study configuration from a YAML file plus `a.b=value` overrides."""
    return load_config(StudyConfig, path, list(overrides))
