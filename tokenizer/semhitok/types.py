"""Value types that cross module boundaries: the token grid of an image batch and every quantizer's output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenGrid:
    """Codes for a batch of images, one entry per patch.
    semantic: (B, h, w) int64 in [0, K)   index into the semantic codebook
    texture:  (B, h, w) int64 in [0, m)   index inside the sub-codebook of `semantic`"""

    semantic: Tensor
    texture: Tensor

    def __post_init__(self) -> None:
        for name in ("semantic", "texture"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"TokenGrid.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype != torch.int64 or value.ndim != 3:
                raise ValueError(f"TokenGrid.{name} must be (B, h, w) int64, got {tuple(value.shape)} {value.dtype}")
        if self.semantic.shape != self.texture.shape:
            raise ValueError(
                f"TokenGrid shapes differ: semantic {tuple(self.semantic.shape)} vs texture {tuple(self.texture.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, h, w)."""
        return tuple(self.semantic.shape)

    def to(self, device: torch.device | str) -> TokenGrid:
        return TokenGrid(self.semantic.to(device), self.texture.to(device))


@dataclass
class QuantizerOutput:  # every quantizer returns this, nothing else
    z_q: Tensor  # (B, L, D) straight-through quantized latent
    indices: Tensor  # (B, L) int64
    losses: dict[str, Tensor]  # unweighted terms; weights live in the loss config
    stats: dict[str, Tensor]  # detached: usage, perplexity
