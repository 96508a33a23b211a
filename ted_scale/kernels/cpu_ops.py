"""CPU per-chunk loss ops: C++ kernels for fp32 chunks, `torch_ops` for everything else.

`torch_ops` walks a chunk in blocks with one torch op per pass: ~16 passes over every logit for
CE + KD, each paying the op's dispatch and a trip through the caches. `csrc/cpu_losses.cpp` does
the same arithmetic one row at a time in three sweeps that stay in L2 (docs/design.md, "Fused
losses on CPU"), about 4x faster per chunk. It is built on first use by
`torch.utils.cpp_extension` (a C++ compiler and ninja; ~12 s, once per environment, in
``$TORCH_EXTENSIONS_DIR``) for this CPU's vector ISA. Same functions and contracts as
`torch_ops`; the vocabulary-parallel and divergence ops are torch_ops' own.
"""

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import torch_ops
from .torch_ops import (  # noqa: F401  (the ops module's full interface)
    divergence_grad_,
    divergence_sums,
    divergence_terms,
    shard_grad_,
    shard_stats,
)

SOURCE = Path(__file__).parent / "csrc" / "cpu_losses.cpp"
# The vector ISA torch itself dispatches to on this CPU: the build never uses an instruction the
# CPU lacks (no -march=native in a cache that another machine may share).
_ARCH_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}
DISABLE_VARIABLE = "TED_SCALE_CPU_KERNELS"


def build_directory(name: str) -> Path:
    """Where the finished build lies: ``$TORCH_EXTENSIONS_DIR/<name>``, else under torch's root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils import cpp_extension  # imports setuptools: only where it is needed

        root = cpp_extension.get_default_build_root()
    return Path(root) / name


def _flags() -> list[str]:
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def extension_name() -> str:
    """The build's name: per Python, torch version, vector ISA and the source and flags' hash, so
    that a build is never changed once made (a process may have it loaded) and every copy of the
    package with this source (a checkout, an installed wheel) shares it."""
    capability = torch.backends.cpu.get_cpu_capability()
    torch_version = re.sub(r"\W", "_", torch.__version__)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags()).encode()).hexdigest()[:12]
    return f"ted_scale_cpu_losses_{python}_torch{torch_version}_{capability.lower()}_{digest}"


def put_pip_ninja_on_path() -> None:
    """torch runs `ninja` from PATH, which a virtual environment used without activating it lacks:
    the locked pip package's binary goes first when no other is found."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def extension() -> ModuleType:
    """The compiled kernels, built on first use. Raises what the compiler raises.

    A build happens in a staging folder of its own and is renamed into place whole, so the final
    folder only ever holds a finished build, imported directly (torch's load would rerun ninja
    and its compiler checks: 150 ms a process against 3). Processes building at once (the ranks
    of a first run) take turns on a lock the kernel releases when its holder dies; a staging
    folder found under it was left by a killed build (whose ninja may still be running: it
    outlives its parent) and is removed, never built into.
    """
    name = extension_name()
    directory = build_directory(name)
    if not (directory / f"{name}.so").exists():
        import fcntl  # POSIX; elsewhere the import error is the reason the kernels do not run

        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(directory.parent / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (directory / f"{name}.so").exists():  # else built while this one waited
                return _build(name, directory)
    return _import(name, directory)


def _build(name: str, directory: Path) -> ModuleType:
    """Builds into ``<name>.building-<pid>`` beside `directory`, then renames it to `directory`.

    Not `ted_scale.io.atomic_replace_dir`: its staging name is fixed, and a killed build's
    orphaned ninja would go on writing into the next build's folder.
    """
    from torch.utils import cpp_extension

    for left in directory.parent.glob(f"{name}.building-*"):
        print(f"ted_scale: removing {left}, left by a build that was killed", file=sys.stderr)
        shutil.rmtree(left, ignore_errors=True)  # its orphaned ninja may still write there
    staging = directory.parent / f"{name}.building-{os.getpid()}"
    staging.mkdir()
    put_pip_ninja_on_path()
    print(f"ted_scale: compiling the CPU loss kernels into {directory}", file=sys.stderr)
    module = cpp_extension.load(
        name, [str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
        build_directory=str(staging),
    )  # fmt: skip
    with open(staging / f"{name}.so", "rb") as built:
        os.fsync(built.fileno())  # on disk before its name says finished
    staging.rename(directory)
    return module


def _import(name: str, directory: Path) -> ModuleType:
    """The finished build's module, imported as torch's load does after building it."""
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def available() -> bool:
    """Whether the kernels run here: not turned off (``TED_SCALE_CPU_KERNELS=0``) and built.
    A failed build is said once, with the reason, and the losses run on `torch_ops`."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    try:
        extension()
    except Exception as e:  # no compiler, no ninja, headers missing: all end the same way
        print(
            f"ted_scale: the CPU loss kernels did not build ({type(e).__name__}: {e}); the "
            f"losses run on torch ops, about 4x slower per chunk ({DISABLE_VARIABLE}=0 skips "
            "the build)",
            file=sys.stderr,
        )
        return False
    return True


def _fp32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _per_target(targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """targets [n] or [n, k] and their weights as contiguous [n, k] int64 and fp32."""
    n = targets.shape[0]
    return targets.view(n, -1).long().contiguous(), weights.view(n, -1).float().contiguous()


def cross_entropy_(logits: Tensor, targets: Tensor, row_weight: Tensor) -> Tensor:
    """`torch_ops.cross_entropy_`: CE rows [n] fp32; logits [n, V] become dloss/dlogits."""
    if not _fp32(logits):
        return torch_ops.cross_entropy_(logits, targets, row_weight)
    return extension().cross_entropy_(logits, *_per_target(targets, row_weight))


def kl_div_(
    logits: Tensor, teacher_logits: Tensor, row_weight: Tensor, temperature: float
) -> Tensor:
    """`torch_ops.kl_div_`: T^2 KL(p_t || p_s) rows [n] fp32; logits become the gradient."""
    if not _fp32(logits, teacher_logits):
        return torch_ops.kl_div_(logits, teacher_logits, row_weight, temperature)
    no_targets = torch.empty(logits.shape[0], 0, dtype=torch.long)
    return extension().cross_entropy_kl_div_(
        logits, teacher_logits, no_targets, no_targets.float(), row_weight.float().contiguous(),
        temperature, 1.0,
    )[1]  # fmt: skip


def cross_entropy_kl_div_(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    row_weight: Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`torch_ops.cross_entropy_kl_div_`: (ce [n], kd [n]) fp32; logits become
    d(CE + kd_weight * KD)/dlogits, teacher_logits are clobbered."""
    if not _fp32(logits, teacher_logits):
        return torch_ops.cross_entropy_kl_div_(
            logits, teacher_logits, targets, row_weight, temperature, kd_weight, ce_weight
        )
    ce_weight = row_weight if ce_weight is None else ce_weight
    ce, kd = extension().cross_entropy_kl_div_(
        logits, teacher_logits, *_per_target(targets, ce_weight),
        row_weight.float().contiguous(), temperature, kd_weight,
    )  # fmt: skip
    return ce, kd
