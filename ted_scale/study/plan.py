"""The runs a study implies: their directories, their run configurations, and which rows the
installed trainer cannot run."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ted_scale.config import ConfigError
from ted_scale.distill.methods import load_run_config
from ted_scale.io import atomic_write_text
from ted_scale.study.config import BASELINE, StudyConfig

DONE_FILE = "study.json"  # written into a run directory once it is trained and evaluated


@dataclass(frozen=True)
class Row:
    """One line of the results table: a method (or the CE-only baseline) and its overrides."""

    name: str
    method: str  # "lm" for the baseline
    overrides: dict[str, Any] = field(default_factory=dict)
    sweep: bool = False


@dataclass
class StudyPaths:
    root: Path

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def student_init(self) -> Path:
        return self.root / "student_init"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def run_dir(self, row: str, seed: int) -> Path:
        return self.runs / f"{slug(row)}-s{seed}"


def slug(name: str) -> str:
    """A row name as a directory name: `ted alpha_layer=0.03` -> `ted_alpha_layer_0.03`."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def rows(study: StudyConfig) -> list[Row]:
    """The baseline, each method, then each sweep point, in table order."""
    out = [Row(BASELINE, "lm")]
    out += [Row(m, m, dict(study.method_overrides.get(m, {}))) for m in study.methods]
    for point in study.sweep:
        merged = {**study.method_overrides.get(point.method, {}), **point.overrides}
        out.append(Row(point.name, point.method, merged, sweep=True))
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw["a"]["b"] = value for key "a.b" (sections created as needed)."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[leaf] = value


def teacher_config(study: StudyConfig, paths: StudyPaths) -> dict[str, Any]:
    """The teacher's pre-training run: `stage: lm` from random weights on the study corpus."""
    raw = copy.deepcopy(study.teacher)
    for key, value in {
        "output_dir": str(paths.teacher),
        "stage": "lm",
        "teacher.pretrained": None,
        "student.init": "random",
        "data.path": str(paths.data),
        "resume": "auto",
    }.items():
        set_dotted(raw, key, value)
    raw.setdefault("seed", study.seeds[0])
    arch = raw.get("teacher", {}).get("arch", {})
    set_dotted(raw, "student.n_layer", arch.get("n_layer", 12))
    return raw


def student_config(study: StudyConfig, paths: StudyPaths, row: Row, seed: int) -> dict[str, Any]:
    """One student run. Every row starts from the teacher's blocks at the layer map: distillation
    rows copy them itself (`student.init: teacher_layers`), the baseline loads the same weights
    from `student_init/` and trains with next-token CE only (`stage: lm`)."""
    raw = copy.deepcopy(study.student)
    for key, value in row.overrides.items():
        set_dotted(raw, key, value)
    fixed: dict[str, Any] = {
        "output_dir": str(paths.run_dir(row.name, seed)),
        "seed": seed,
        "data.path": str(paths.data),
        "teacher.pretrained": str(paths.teacher / "student_hf"),
        "resume": "auto",
    }
    if row.method == "lm":
        fixed |= {
            "stage": "lm",
            "student.init": "pretrained",
            "student.pretrained": str(paths.student_init),
        }
    else:
        fixed |= {"stage": "all", "method": row.method, "student.init": "teacher_layers"}
    for key, value in fixed.items():
        set_dotted(raw, key, value)
    return raw


def write_run_config(raw: dict[str, Any], path: Path) -> str | None:
    """Write `raw` as YAML to `path` and check it with the installed trainer's loader.

    Returns None when it loads, or the loader's reason when the method is unknown to it (the row
    is then "not yet implemented"). Any other error is the study config's fault and is raised.
    """
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    try:
        load_run_config(path)
    except ConfigError as e:
        if re.search(r"\bmethod\b", str(e)) and "must be one of" in str(e):
            return str(e)
        raise ConfigError(f"{path}: {e}") from None
    return None


def is_done(run_dir: Path) -> bool:
    """A run counts as finished once its `study.json` (training and evaluation) is written."""
    return (run_dir / DONE_FILE).is_file()


def read_done(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / DONE_FILE).read_text())
