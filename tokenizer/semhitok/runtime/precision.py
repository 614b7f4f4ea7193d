"""Precision (DESIGN §8): `auto | bf16 | fp32` for training and inference, one resolver for every entry point.

`auto` = bf16 autocast where the device computes bf16 natively: CUDA devices with bf16 support, and CPUs with bf16
matrix instructions (x86 `avx512_bf16` / `amx_bf16`, Arm `bf16`; on this project's CPUs bf16 matmul runs ~4.7x the
fp32 rate). Elsewhere `auto` is fp32. An explicit `bf16` is honoured on any device (emulated where not native).
Master weights and optimizer state stay fp32: autocast only changes the dtype of the matmuls inside it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch

PRECISIONS = ("auto", "bf16", "fp32")
Precision = Literal["auto", "bf16", "fp32"]
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16, Intel AMX, Armv8.6 BF16


@cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 matrix instructions (read from the kernel's CPU flags)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.split(":", 1)[1].split()}  # fmt: skip
    return bool(flags & _CPU_BF16_FLAGS)


def device_has_bf16(device: torch.device) -> bool:
    """Native bf16 on `device` (CUDA: compute capability with bf16; CPU: `cpu_has_bf16`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


@dataclass(frozen=True)
class ResolvedPrecision:
    """What a `precision` setting means on one device."""

    setting: str
    dtype: torch.dtype | None  # torch.bfloat16 for bf16 autocast; None = fp32
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype is torch.bfloat16

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The autocast context for a forward pass (a no-op context in fp32)."""
        return torch.autocast(device.type, dtype=self.dtype) if self.bf16 else nullcontext()

    def describe(self) -> str:
        """One phrase for the run's start line, e.g. 'bf16 autocast (auto: this CPU has avx512_bf16-class ...)'."""
        return f"{'bf16 autocast' if self.bf16 else 'fp32'} ({self.reason})"


def resolve_precision(setting: str, device: torch.device) -> ResolvedPrecision:
    """`auto` / `bf16` / `fp32` on `device`; ValueError names an unknown setting."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "fp32":
        return ResolvedPrecision(setting, None, "precision: fp32")
    native = device_has_bf16(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if setting == "bf16":
        return ResolvedPrecision(setting, torch.bfloat16, "precision: bf16" + ("" if native else
                                 f"; {where} has no native bf16, expect it to be slow"))  # fmt: skip
    if native:
        return ResolvedPrecision(setting, torch.bfloat16, f"precision: auto; {where} computes bf16 natively")
    return ResolvedPrecision(setting, None, f"precision: auto; {where} has no native bf16")
