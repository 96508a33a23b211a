"""Process-group set-up that works under ``deepspeed``, ``torchrun`` and plain ``python``, and the
parallel dimensions built on it.

World = data-parallel (DP) x tensor-parallel (TP). Ranks of one TP group hold shards of the same
weights and read the same micro-batch; DP groups read disjoint data and average gradients. The
groups come from a PyTorch ``DeviceMesh`` of shape (dp, tp); DeepSpeed is handed them through its
``mpu`` interface, so ZeRO partitions and all-reduces over the DP group only.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ted_scale.process import die_with_parent

_WATCH = None
"""This process's PeerWatch (ted_scale/parallel/watch.py) while it runs."""


class ParallelLayoutError(ValueError):
    """The world size and the requested parallel sizes do not fit together."""


@dataclass(frozen=True)
class ParallelDims:
    """This rank's place in the (dp, tp) layout and the groups to talk over.

    ``dp_group`` / ``tp_group`` are process groups (the default group stands for the whole world
    when a dimension spans it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_size: int
    tp_size: int
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def layout(self) -> str:
        """The layout as the run's first line states it, e.g. ``dp=2 tp=2 sp=off`` (sequence
        parallelism is not implemented: always off)."""
        return f"dp={self.dp_size} tp={self.tp_size} sp=off"

    def deepspeed_mpu(self) -> _DeepSpeedMPU:
        """The groups in the interface DeepSpeed's ``initialize(mpu=...)`` reads."""
        return _DeepSpeedMPU(self)


class _DeepSpeedMPU:
    """Megatron's ``mpu`` interface over ``ParallelDims`` (model parallel = tensor parallel)."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def free_port() -> int:
    """A TCP port on the loopback interface that is free now (for a group's master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_cpu_comm_op_once(local_rank: int) -> None:
    """DeepSpeed JIT-builds its shared-memory CPU collectives in every rank that starts without a
    build, and ranks building it at once crashed (SIGABRT in the first multi-rank run of a fresh
    environment). One rank per node builds it while the others wait; then each only loads it."""
    from deepspeed.comm.torch import build_shm_op

    if local_rank == 0:
        build_shm_op()
    dist.barrier()


def _tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_STEP_TASKS_PER_NODE`` (``8(x2)``, ``2,1``, ``4(x2),2``) as one count per
    node; [] when it is not in that form."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return []
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def _ranks_from_slurm() -> bool:
    """A task of an ``srun`` step of several tasks, started without the launcher's ``RANK``
    (``deepspeed --launcher slurm`` runs the script itself under ``srun -n N``, for MPI discovery):
    take the rank variables from Slurm's. ``MASTER_ADDR`` and ``MASTER_PORT`` (rank 0's node and
    a free port on it) must be exported to the step (docs/multinode.md). False outside such a
    step; the batch script itself (no ``SLURM_STEP_NUM_TASKS``) runs as one process."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if "RANK" in env or not tasks.isdigit() or int(tasks) < 2 or "SLURM_PROCID" not in env:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ParallelLayoutError(
            f"started by srun as task {env['SLURM_PROCID']} of {tasks} without "
            f"{' and '.join(missing)}: export MASTER_ADDR (the first node's address) and "
            "MASTER_PORT (a free port there) before srun, or start one torchrun per node "
            "(docs/multinode.md)"
        )
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    node = int(env.get("SLURM_NODEID", "0"))
    env.update(
        RANK=env["SLURM_PROCID"],
        LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
        WORLD_SIZE=tasks,
        LOCAL_WORLD_SIZE=str(per_node[node] if node < len(per_node) else 1),
    )
    return True


def init_parallel(tensor_parallel_size: int = 1, peer_timeout_s: float = 0.0) -> ParallelDims:
    """Join (or, for a plain ``python`` run, create) the process group, pick this rank's device,
    and lay the world out as (dp, tp).

    CPU ranks use gloo and DeepSpeed's CPU accelerator; GPU ranks use NCCL, one GPU per local rank.
    ``peer_timeout_s`` > 0 (and more than one rank): a rank that stops answering for that long
    stops every rank with a message naming it (``PeerWatch``), instead of leaving them waiting in
    a collective until the process group's timeout.
    """
    global _WATCH
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must be set before deepspeed is imported: its accelerator is chosen once, at import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ or _ranks_from_slurm():  # a launcher's (or srun's) rank, or a spawner's
        die_with_parent()
    else:  # plain `python`: a group of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    import deepspeed

    # DeepSpeed still calls collectives that this torch deprecates; the warning is not actionable.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend)  # env:// from the launcher's variables
        if not cuda:
            _build_cpu_comm_op_once(local_rank)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    world_size = dist.get_world_size()
    store_known = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ  # env:// groups
    if peer_timeout_s > 0 and world_size > 1 and store_known and _WATCH is None:
        from ted_scale.parallel.watch import PeerWatch

        _WATCH = PeerWatch(dist.get_rank(), world_size, peer_timeout_s).start()
    if world_size % tensor_parallel_size:
        raise ParallelLayoutError(
            f"parallel.tensor_parallel_size={tensor_parallel_size} does not divide the world size "
            f"{world_size}: world = data-parallel x tensor-parallel"
        )
    dp_size = world_size // tensor_parallel_size
    mesh = init_device_mesh(
        device.type, (dp_size, tensor_parallel_size), mesh_dim_names=("dp", "tp")
    )
    return ParallelDims(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        dp_size=dp_size,
        tp_size=tensor_parallel_size,
        mesh=mesh,
    )


def teacher_dims(dims: ParallelDims, size: int) -> ParallelDims:
    """The teacher's own layout: ``size`` consecutive ranks hold one teacher split Megatron-style,
    every rank with its own micro-batch (the student data-parallel over them all); ``dims`` itself
    when teacher and student are split alike (``size`` = ``dims.tp_size``). A collective: every
    rank calls it."""
    if size == dims.tp_size:
        return dims
    if dims.tp_size != 1:
        raise ParallelLayoutError(
            f"a teacher split over {size} ranks needs an unsplit student, not one over "
            f"{dims.tp_size}"
        )
    if dims.world_size % size:
        raise ParallelLayoutError(
            f"parallel.teacher_tensor_parallel_size={size} does not divide the world size "
            f"{dims.world_size}: the teacher's groups are consecutive runs of {size} ranks"
        )
    groups = dims.world_size // size
    mesh = init_device_mesh(dims.device.type, (groups, size), mesh_dim_names=("dp", "tp"))
    return ParallelDims(
        rank=dims.rank,
        world_size=dims.world_size,
        local_rank=dims.local_rank,
        device=dims.device,
        dp_size=groups,
        tp_size=size,
        mesh=mesh,
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close_parallel() -> None:
    """Leave the process group together, at the end of a process that finished its work.

    A rank that exits while a peer's gloo threads still talk to it can abort the peer at exit
    ("terminate called without an active exception", SIGABRT): a finished run would report a
    failure. Every rank waits for the others, then the group is torn down before interpreter exit.
    The peer watch stops after the barrier: a rank that ends first is not taken for a lost one.
    """
    global _WATCH
    if dist.is_initialized():
        dist.barrier()
        if _WATCH is not None:
            _WATCH.stop()
            _WATCH = None
        dist.destroy_process_group()


def zero3_gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full CPU state dict of ``module``, gathering ZeRO-3 partitions when there are any."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    context = contextlib.nullcontext()
    if params:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with context:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
