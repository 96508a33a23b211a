"""What a resume reads, read without running code, and checked against the checksums saved with it.

- The per-rank RNG state is stored as ``rng_rank<r>.safetensors`` (tensors plus JSON metadata):
  a format that cannot carry code.
- DeepSpeed's own files (``*_model_states.pt``, ``*_optim_states.pt``) are pickles; its checkpoint
  engine is wrapped so they load with ``torch.load(weights_only=True)`` and an allow-list of the
  few non-tensor types DeepSpeed stores. Anything else is refused, naming the file.
- Every file of a checkpoint gets a sha256 in its ``complete`` record; :func:`verify_checkpoint`
  compares them before a resume loads anything (see docs/design.md, "Checkpoints").
"""

from __future__ import annotations

import json
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ted_scale.io import file_sha256

COMPLETE_NAME = "complete"
RECORD_VERSION = 1


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds Python objects outside the allow-list, or is not readable."""


# ----------------------------------------------------------------------------- RNG state
def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.safetensors"


def save_rng_state(path: Path) -> None:
    """Python, NumPy, torch (and CUDA) generator states of this process, as safetensors."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python_version": version, "python_gauss": gauss, "numpy_name": name}
    meta.update(numpy_pos=int(pos), numpy_has_gauss=int(has_gauss), numpy_cached=float(cached))
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})


def read_rng_state(path: Path) -> Callable[[], None]:
    """Read what :func:`save_rng_state` wrote (an unreadable file is named) and return the
    function that restores it: ranks read first, agree that every file is good, then restore."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["rng"])
        mt = tuple(int(x) for x in tensors["python"].tolist())
        python = (meta["python_version"], mt, meta["python_gauss"])
        numpy = (
            meta["numpy_name"],
            tensors["numpy"].numpy().astype(np.uint32),
            meta["numpy_pos"],
            meta["numpy_has_gauss"],
            meta["numpy_cached"],
        )
        cpu = tensors["torch"]
    except (SafetensorError, KeyError, ValueError, TypeError, OSError) as e:
        raise UnsafeCheckpointError(f"{path}: not a ted_scale RNG state ({e})") from None

    def restore() -> None:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])

    return restore


# ----------------------------------------------------------------------------- DeepSpeed's pickles
def _allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its model and optimizer states, and no more."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None, *, mmap: bool = False) -> Any:
    """``torch.load`` that can only build tensors, plain containers and the allow-listed types
    (``mmap``: tensors stay on disk, for a check that reads only the pickled structure)."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|Unsupported operand) ?([\w.]*)", str(e))
        what = f" ({found.group(0).strip()})" if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds Python objects outside the allow-list of a "
            f"checkpoint{what}, and loading it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeCheckpointError(f"{path}: unreadable checkpoint file ({e})") from None


class SafeLoadingCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: saving is unchanged, loading is ``safe_torch_load``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)


def check_loadable(tag_dir: Path) -> None:
    """Every DeepSpeed file of ``tag_dir`` through the safe loader, tensors left on disk: a rank
    that would refuse a file inside ``load_checkpoint`` (its own optimizer partition) is found
    before DeepSpeed's collectives, where the other ranks would wait for it."""
    for path in sorted(tag_dir.glob("*.pt")):
        safe_torch_load(path, map_location="cpu", mmap=True)


def make_loads_safe(engine: Any) -> None:
    """Route every load of ``engine.load_checkpoint`` through :func:`safe_torch_load`."""
    if not isinstance(engine.checkpoint_engine, SafeLoadingCheckpointEngine):
        engine.checkpoint_engine = SafeLoadingCheckpointEngine(engine.checkpoint_engine)


# ----------------------------------------------------------------------------- integrity
def checkpoint_files(tag_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``tag_dir`` (relative path -> hex), ``complete`` left out."""
    return {
        str(p.relative_to(tag_dir)): file_sha256(p)
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE_NAME
    }


def complete_record(tag_name: str, tag_dir: Path) -> str:
    """The text of ``tag_dir/complete``: the tag and the checksum of each of its files."""
    record = {"tag": tag_name, "version": RECORD_VERSION, "sha256": checkpoint_files(tag_dir)}
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def verify_checkpoint(tag_dir: Path) -> str | None:
    """None when every file recorded in ``tag_dir/complete`` is there with its checksum;
    otherwise why not, naming the file."""
    marker = tag_dir / COMPLETE_NAME
    try:
        record = json.loads(marker.read_text())
        expected = record["sha256"]
        assert isinstance(expected, dict) and expected
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{marker}: no checksum record (written by an older ted_scale, or damaged)"
    for name, sha in sorted(expected.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        if file_sha256(path) != sha:
            return (
                f"{path}: checksum mismatch ({path.stat().st_size} bytes; corrupted or truncated)"
            )
    return None
