"""How a training process runs (one type for both trainers): plain python, torchrun (DDP) or a DeepSpeed engine
under any launcher; the process group, seeding, collectives on ints, per-rank RNG states, the DDP wrapper."""

from __future__ import annotations

import inspect
import os
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from semhitok.runtime.distributed import resolve_device


@dataclass(frozen=True)
class Launch:
    """How this process runs: "single" (plain python), "ddp" (torchrun, WORLD_SIZE > 1) or "deepspeed" (a ZeRO JSON
    is given; any launcher). rank / local_rank / world_size come from the launcher's environment."""

    mode: Literal["single", "ddp", "deepspeed"] = "single"
    device: torch.device = torch.device("cpu")
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, device_kind: str, deepspeed: bool = False, env: dict[str, str] | None = None) -> Launch:
        """The launch from the environment torchrun / the deepspeed launcher set (RANK, LOCAL_RANK, WORLD_SIZE)."""
        env = os.environ if env is None else env
        world, rank, local = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
        mode = "deepspeed" if deepspeed else "ddp" if world > 1 else "single"
        return cls(mode, resolve_device(device_kind, local), rank, local, world)


def join_process_group(launch: Launch) -> bool:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU); a world-1 DeepSpeed run gets an in-memory
    group. Returns True if this call created the group (the caller destroys it)."""
    if launch.mode == "single" or dist.is_initialized():
        return False
    backend = "nccl" if launch.device.type == "cuda" else "gloo"
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)
    if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:  # DeepSpeed without a launcher
        for key in ("RANK", "LOCAL_RANK"):  # DeepSpeed asserts on these, as a launcher would set them
            os.environ.setdefault(key, "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_int(value: int, device: torch.device, op: Literal["sum", "min"] = "sum") -> int:
    """An int reduced over all ranks ("sum" | "min"); the value itself in a single process."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return int(t.item())


def seed_everything(seed: int) -> None:
    """torch, numpy and python `random` seeded alike on every rank."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def wrap_ddp(module: nn.Module, launch: Launch, *, sync_buffers: bool = True, find_unused: bool = False) -> nn.Module:
    """DDP in a process group (else the module itself); `sync_buffers=False`: no buffer broadcast per forward."""
    if not dist.is_initialized() or launch.mode == "deepspeed":
        return module
    # torch >= 2.13 renames broadcast_buffers (buffers are still synced once at construction either way)
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": sync_buffers}
    ids = [launch.device.index] if launch.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused, **sync)


def rank_rng_states(launch: Launch) -> dict[str, Tensor]:
    """Every rank's torch CPU (+ CUDA) generator state, gathered: {"cpu.<rank>": uint8 tensor, "cuda.<rank>": ...}.
    (the checkpoint group `rng` holds rank 0's torch / numpy / python states.)"""
    mine = {"cpu": torch.get_rng_state()}
    if launch.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(launch.device)
    if not dist.is_initialized():
        return {f"{k}.0": v for k, v in mine.items()}
    out = {}
    for kind, state in mine.items():
        parts = [torch.empty_like(state, device=launch.device) for _ in range(launch.world_size)]
        dist.all_gather(parts, state.to(launch.device))
        out.update({f"{kind}.{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def restore_rank_rng(states: dict[str, Tensor], launch: Launch) -> None:
    torch.set_rng_state(states[f"cpu.{launch.rank}"])
    if launch.device.type == "cuda" and f"cuda.{launch.rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{launch.rank}"], launch.device)
