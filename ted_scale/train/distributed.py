"""Process-group set-up that works under ``deepspeed``, ``torchrun`` and plain ``python``."""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, for a plain ``python`` run, create) the process group; pick this rank's device.

    CPU ranks use gloo and DeepSpeed's CPU accelerator; GPU ranks use NCCL, one GPU per local rank.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must be set before deepspeed is imported: its accelerator is chosen once, at import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
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
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A full CPU state dict of ``module``, gathering ZeRO-3 partitions when there are any."""
    import deepspeed

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    context = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if params
        else contextlib.nullcontext()
    )
    with context:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
