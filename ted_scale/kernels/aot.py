"""Ahead-of-time compilation of the Triton loss kernels for a GPU, on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
lowers a kernel to PTX and assembles it with the ``ptxas`` bundled in the Triton wheel: no GPU or
CUDA driver is involved. The signature, constexprs and specialisation attributes (16-byte
divisibility of pointers and integers) come from Triton's own launch binder applied to the
arguments of a `triton_ops.Launch` built on meta tensors, so each compile is the one a launch on
that GPU would trigger. ``ptxas -v`` (run by Triton itself) gives registers and spills; Triton's
metadata gives the shared memory.

Results are cached as JSON under Triton's own cache key (kernel source and callee hash,
signature, attributes, options, target, Triton version, compiler env vars), so a cache entry can
never describe other code: see `cache_dir` for the location.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton._C.libtriton import get_cache_invalidating_env_vars
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.compiler import get_cache_key
from triton.runtime.jit import create_function_from_signature

from ted_scale.io import atomic_write_json

from .triton_ops import Launch

# Registers one SM gives one thread block, and one thread at most (sm_80 .. sm_90).
REGISTERS_PER_BLOCK, MAX_REGISTERS_PER_THREAD = 65536, 255
# Largest shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}

_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class CompiledKernel:
    """What ``ptxas -v`` and Triton report for one kernel compiled for one target."""

    kernel: str
    capability: int
    signature: dict[str, str]
    num_warps: int
    registers: int  # per thread
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    ptx_bytes: int
    cubin_bytes: int
    ptxas_log: str

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    @property
    def max_registers(self) -> int:
        """Registers per thread that still let one block of num_warps warps run on an SM."""
        return min(MAX_REGISTERS_PER_THREAD, REGISTERS_PER_BLOCK // (32 * self.num_warps))


def cache_dir() -> Path:
    """``$TED_SCALE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ted_scale/triton-aot`` (default
    ``~/.cache``): outside the work tree, per user, and content-addressed with atomic writes, so
    concurrent test workers and CI runners restoring an old copy only ever read matching entries."""
    if explicit := os.environ.get("TED_SCALE_KERNEL_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ted_scale" / "triton-aot"


def compile_launch(launch: Launch, capability: int, *, use_cache: bool = True) -> CompiledKernel:
    """Compiles ``launch``'s kernel for ``sm_<capability>`` (80, 90, ...) and reads its resources.

    launch: from `triton_ops.cross_entropy_launch` / `kl_div_launch` on meta tensors (the GPU
    launch configuration; no memory is touched).
    Raises: whatever Triton or ptxas raise when the kernel does not compile for the target.
    """
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"num_warps": launch.num_warps}
    bound, specialization, options = binder(**launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    env_vars = get_cache_invalidating_env_vars()
    key = hashlib.sha256(get_cache_key(source, backend, options, env_vars).encode()).hexdigest()
    path = (
        cache_dir() / f"{fn.__name__}-sm{capability}-v1-{key[:32]}.json"
    )  # v1: CompiledKernel fields
    if use_cache and path.exists():
        return CompiledKernel(**json.loads(path.read_text()))

    log = io.StringIO()
    with (
        triton.knobs.nvidia.scope(),
        triton.knobs.compilation.scope(),
        contextlib.redirect_stdout(log),
    ):
        triton.knobs.nvidia.dump_ptxas_log = True  # printed by Triton's ptxas step
        triton.knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas
        compiled = triton.compile(source, target=target, options=options.__dict__)
    ptxas_log = log.getvalue()
    spills = _PTXAS_SPILLS.search(ptxas_log)
    registers = _PTXAS_REGISTERS.search(ptxas_log)
    if spills is None or registers is None:
        raise RuntimeError(
            f"{fn.__name__} sm_{capability}: no resource usage in ptxas -v output:\n{ptxas_log}"
        )
    result = CompiledKernel(
        kernel=fn.__name__,
        capability=capability,
        signature=signature,
        num_warps=compiled.metadata.num_warps,
        registers=int(registers[1]),
        stack_bytes=int(spills[1]),
        spill_store_bytes=int(spills[2]),
        spill_load_bytes=int(spills[3]),
        shared_bytes=compiled.metadata.shared,
        ptx_bytes=len(compiled.asm["ptx"]),
        cubin_bytes=len(compiled.asm["cubin"]),
        ptxas_log=ptxas_log.strip(),
    )
    if use_cache:
        atomic_write_json(path, asdict(result))
    return result
