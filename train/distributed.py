"""Process-group setup for deepspeed / torchrun / plain python, and small collectives."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, local_rank, world).

    Without a launcher (plain `python launch/train.py`) the env a one-process group needs is
    filled in, so DeepSpeed does not fall back to MPI discovery.
    """
    import deepspeed

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, dev: torch.device) -> list[float]:
    """Sum a list of numbers over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
