"""Distributed set-up of the trainer: torchrun's environment, the default process group, and the
few collectives the loop needs besides the loss (gradient averaging without DDP's hooks,
counters summed over ranks, a value broadcast from rank 0)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (absent: one process) and, for
    several processes, initialise the default group from ``MASTER_ADDR``/``MASTER_PORT``: nccl on
    CUDA, gloo on the CPU. ``device="auto"``: ``cuda:LOCAL_RANK`` when CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available (CPU-only torch, or no visible device); "
                             f"use device 'cpu' or 'auto'")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    global _OWNED_GROUP
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
        _OWNED_GROUP = True
    return DistEnv(rank, world, local, dev)


# Whether init_distributed created the default group (a caller's own group is left alone).
_OWNED_GROUP = False


def shutdown_distributed(clean: bool = True) -> None:
    """Destroy the default group if :func:`init_distributed` created it. A process that exits
    with a live gloo group can abort in interpreter finalisation ("terminate called without an
    active exception", exit -6) while gloo's worker threads still hold finished work; destroying
    the group first makes the exit clean. After a run that ended normally (``clean``) the
    ranks first meet at a barrier, so that none tears its connections down while another is
    still using them (the main rank writes the model and metrics after the last step; a rank
    that had finished long before aborted that way, rarely, under load)."""
    global _OWNED_GROUP
    if _OWNED_GROUP and dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    _OWNED_GROUP = False


def all_reduce_grads(params: List[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer (what DDP does, without its hooks)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(env: DistEnv, n: int) -> int:
    """``n`` summed over all ranks (``n`` itself in a single process)."""
    if not env.distributed:
        return n
    t = torch.tensor([n], dtype=torch.long, device=env.device)
    dist.all_reduce(t)
    return int(t.item())


def broadcast_int(env: DistEnv, n: int) -> int:
    """Rank 0's ``n`` on every rank (``n`` itself in a single process)."""
    if not env.distributed:
        return n
    t = torch.tensor([n], dtype=torch.long, device=env.device)
    dist.broadcast(t, 0)
    return int(t.item())
