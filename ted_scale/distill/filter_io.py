"""Filters on disk: ``<name>.safetensors`` plus ``filters.json``, the record that ties them to a
teacher and a layer map so that Stage II refuses filters made for another model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from ted_scale.distill.filters import FilterBank
from ted_scale.io import atomic_replace_dir, read_safetensors
from ted_scale.parallel import gathered_state

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FilterRecord:
    teacher: str
    """Where the teacher came from (hub name or folder), for people reading the record."""
    teacher_fingerprint: str
    """sha256 over the teacher's weights: what identity checks compare."""
    layer_map: list[int]
    arch: str
    d_in: int
    d_out: int
    format_version: int = FORMAT_VERSION


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every tensor's name, shape and fp32 bytes: the identity of a set of weights.

    Taken over the whole (gathered) weights, so it does not depend on the parallel layout; a
    collective when ``model`` is sharded (every rank calls it).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(gathered_state(model).items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FilterMismatchError(ValueError):
    """Saved filters were made for another teacher, layer map or architecture."""


def save_filters(states: dict[str, dict[str, Tensor]], record: FilterRecord, out_dir: Path) -> None:
    """Write each bank's state dict as ``out_dir/<name>.safetensors`` and the record as
    ``filters.json``.

    ``filters/`` is replaced whole (:func:`ted_scale.io.atomic_replace_dir`).
    """
    with atomic_replace_dir(out_dir) as tmp:
        for name, state in states.items():
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(state, tmp / f"{name}.safetensors", metadata={"format": "pt"})
        (tmp / "filters.json").write_text(json.dumps(asdict(record), indent=2) + "\n")


def read_record(filters_dir: Path) -> FilterRecord:
    path = filters_dir / "filters.json"
    if not path.is_file():
        raise FileNotFoundError(f"no filters record at {path}: run Stage I (stage: filters) first")
    try:
        return FilterRecord(**json.loads(path.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise FilterMismatchError(f"{path}: not a ted_scale filters record: {e}") from e


def check_record(found: FilterRecord, expected: FilterRecord, filters_dir: Path) -> None:
    """Raise naming every field in which the saved filters differ from what this run needs."""
    diffs = [
        f"{key}: saved {getattr(found, key)!r}, this run {getattr(expected, key)!r}"
        for key in ("teacher_fingerprint", "layer_map", "arch", "d_in", "d_out", "format_version")
        if getattr(found, key) != getattr(expected, key)
    ]
    if diffs:
        raise FilterMismatchError(
            f"filters in {filters_dir} were made for another teacher or map ({found.teacher}): "
            + "; ".join(diffs)
        )


def load_filters_into(bank: FilterBank, filters_dir: Path, name: str) -> None:
    path = filters_dir / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"missing filter weights {path}")
    state, _ = read_safetensors(path)
    own = bank.state_dict()
    for key, tensor in state.items():
        if key not in own or own[key].shape != tensor.shape:
            shape = tuple(own[key].shape) if key in own else "absent"
            raise FilterMismatchError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the filters need {shape}"
            )
    bank.load_state_dict(state)
