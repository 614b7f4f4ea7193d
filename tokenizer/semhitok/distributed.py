"""Process-group plumbing shared by the tokenizer and MLLM trainers: launch detection, device, unwrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from semhitok.configio import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but CUDA is not available")
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device_kind: str) -> tuple[DistInfo, torch.device]:
    """Join the `torchrun` process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); else a single process."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(device_kind, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world), device


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model
