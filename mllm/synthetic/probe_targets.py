"""Probe targets of synthetic scenes: what an attribute probe (`semhitok.attribute_probe`) must read from an image.

  count     multiclass: number of objects - 1 (1 to 4 objects)
  color     multilabel over COLORS: is there an object of this colour
  shape     multilabel over SHAPES: is there an object of this shape
  position  multilabel over a 3 x 3 grid of image cells: does an object's centre lie in this cell
  category  multilabel over CATEGORIES (POPE's question): is there a <colour> <shape>
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mllm.synthetic.scene import CATEGORIES, COLORS, SHAPES, Scene

CELLS = 3  # position cells per side


def _presence(scenes: Sequence[Scene], names: Sequence[str], key) -> Tensor:
    index = {n: i for i, n in enumerate(names)}
    out = torch.zeros(len(scenes), len(names))
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            out[row, index[key(obj)]] = 1.0
    return out


def _cell(obj) -> str:
    x, y = obj.center
    return f"{min(int(y * CELLS), CELLS - 1)},{min(int(x * CELLS), CELLS - 1)}"


def probe_targets(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """{task: target}: count (N,) int64; color (N, 10), shape (N, 6), position (N, 9), category (N, 60) float 0/1."""
    cells = [f"{r},{c}" for r in range(CELLS) for c in range(CELLS)]
    return {
        "count": torch.tensor([len(s.objects) - 1 for s in scenes]),
        "color": _presence(scenes, COLORS, lambda o: o.color),
        "shape": _presence(scenes, SHAPES, lambda o: o.shape),
        "position": _presence(scenes, cells, _cell),
        "category": _presence(scenes, CATEGORIES, lambda o: o.category),
    }
