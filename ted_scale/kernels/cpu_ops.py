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

from ted_scale.io import atomic_write_bytes, atomic_write_text

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
# Written into a build's folder once it has built and loaded; the build never changes after
# (its name hashes its source), so later processes import it without torch's build step.
BUILT = "built"


def build_directory(name: str) -> Path:
    """Where `extension` builds: ``$TORCH_EXTENSIONS_DIR/<name>``, else torch's default root."""
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


@functools.cache
def extension() -> ModuleType:
    """The compiled kernels, built on first use. Raises what the compiler raises.

    Processes building at once (the ranks of a first run) take turns on a lock the kernel
    releases when its holder dies; torch's own lock file (``lock``), which a build killed midway
    leaves behind and every later load would wait on forever, is removed when found under it.
    """
    name = extension_name()
    directory = build_directory(name)
    if (directory / BUILT).exists():  # torch's load would run ninja and the compiler checks
        return _import(name, directory)

    import fcntl  # POSIX; elsewhere the import error is the reason the kernels do not run

    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: take the pip package's
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    directory.mkdir(parents=True, exist_ok=True)
    # Built from a copy inside its folder: torch's build file names the source's path, and a
    # source elsewhere (another copy of the package) would rebuild it.
    source = directory / SOURCE.name
    with open(directory / "ted_scale.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = directory / "lock"
        if stale.exists():
            print(f"ted_scale: removing {stale}, left by a build that was killed", file=sys.stderr)
            stale.unlink()
        if not source.exists():
            atomic_write_bytes(source, SOURCE.read_bytes())
        if not any(directory.glob(f"{name}*.so")):
            print(f"ted_scale: compiling the CPU loss kernels into {directory}", file=sys.stderr)
        module = cpp_extension.load(
            name, [str(source)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )  # fmt: skip
        atomic_write_text(directory / BUILT, f"{module.__file__}\n")
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
