"""Value types that cross module boundaries: the token grid of an image batch and every quantizer's output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenGrid:
    """Codes for a batch of images, one entry per patch.
    semantic: (B, h, w) int64 in [0, K)   index into the semantic codebook
    texture:  (B, h, w) int64 in [0, m)   index inside the sub-codebook of `semantic`

    Every stage-2 quantizer has K*m codes, numbered by the flat index f = semantic * m + texture in [0, K*m), i.e.
    row-major over (K, m): a (..., K, m) tensor flattened over its last two dims is in flat index order. This class
    owns the conversion (`flat` / `from_flat`, and `flat_index` / `split_index` for tensors of any shape).
    For SemHiTok's hierarchical quantizer the two levels are real: `semantic` is the code of the semantic (EMA)
    codebook and `texture` one of the m codes of its sub-codebook. The flat and shared-index baselines have one
    codebook of K*m joint codes and no semantic codebook at this level: there `semantic` = f // m is only a coarse
    group index (which block of m consecutive codes) and `texture` = f % m the code inside the block. For every
    quantizer the grid names one code per patch and `SemHiTok.code_embeddings` / `code_table` / `decode` read that
    code's vectors, so the MLLM, `VisualVocab` and the metrics treat all quantizers alike."""

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

    def flat(self, m: int) -> Tensor:
        """-> flat code indices f = semantic * m + texture (B, h, w) int64 in [0, K*m) (texture must be in [0, m))."""
        return TokenGrid.flat_index(self.semantic, self.texture, m)

    @classmethod
    def from_flat(cls, flat: Tensor, m: int) -> TokenGrid:
        """Flat code indices f (B, h, w) int64 -> TokenGrid(f // m, f % m); inverse of `flat`."""
        return cls(*cls.split_index(flat, m))

    @staticmethod
    def flat_index(semantic: Tensor, texture: Tensor, m: int) -> Tensor:
        """(semantic, texture) indices (...) int64 -> flat index f = semantic * m + texture (...)."""
        return semantic * m + texture

    @staticmethod
    def split_index(flat: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Flat indices f (...) int64 -> (semantic f // m, texture f % m), each (...)."""
        return flat.div(m, rounding_mode="floor"), flat.remainder(m)


@dataclass
class QuantizerOutput:  # every quantizer returns this, nothing else
    z_q: Tensor  # (B, L, D) straight-through quantized latent
    indices: Tensor  # (B, L) int64
    losses: dict[str, Tensor]  # unweighted terms; weights live in the loss config
    stats: dict[str, Tensor]  # detached: usage, perplexity
