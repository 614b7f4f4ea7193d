"""Devices and wrapped modules shared by every entry point (the launch itself: `semhitok.runtime.launch`)."""

from __future__ import annotations

import torch
from torch import nn

from semhitok.runtime.configio import ConfigError


def resolve_device(kind: str, local_rank: int = 0, *, option: str = "train.device") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" (device `local_rank`) or "cuda:N" -> torch.device.
    ConfigError, one line naming `option` (the setting it came from, e.g. "--device"), for a device that is not there."""
    if kind == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(kind)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} {kind}: not a device (expected auto, cpu, cuda or cuda:N)")
    return _check_cuda(device, local_rank, f"{option} {kind}") if device.type == "cuda" else device


def _check_cuda(device: torch.device, local_rank: int, where: str) -> torch.device:
    """cuda / cuda:N -> the indexed device (local_rank when no index), if it exists."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: no CUDA device available (torch.cuda.is_available() is False)")
    index, count = local_rank if device.index is None else device.index, torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{where}: no CUDA device {index} ({count} visible)")
    return torch.device("cuda", index)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model
