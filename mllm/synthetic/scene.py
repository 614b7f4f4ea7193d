"""Scenes of the synthetic domain: frozen dataclasses, GenEval's spatial rule and a seeded sampler.

Geometry is in normalised image coordinates: x to the right, y downwards, both in [0, 1], so one scene renders at
any resolution. An object is one shape in one palette colour that exactly fills the axis-aligned square of side
`size` centred at `center`. Objects never overlap: their squares keep `gap` between each other and `margin` to the
border. Every pair of objects in a sampled scene has an unambiguous GenEval relation (it does not change when one
object moves by `relation_tol`), so captions, questions and the detector agree on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType

import numpy as np

from mllm.constants import Box

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GenEval's words
TEXTURES = ("noise", "stripes", "checker", "gradient", "dots")
RELATIONS = ("left of", "right of", "above", "below")  # GenEval's position words
OPPOSITE = MappingProxyType({"left of": "right of", "right of": "left of", "above": "below", "below": "above"})
CATEGORIES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)  # POPE/MME object categories: "red circle", ...


@dataclass(frozen=True)
class SceneObject:
    """One object. shape in SHAPES, color in COLORS; center (x, y) and size (side of its square) in [0, 1]."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float

    def __post_init__(self):
        if self.shape not in SHAPES or self.color not in COLORS or not 0 < self.size <= 1:
            raise ValueError(f"bad object {self}: shape in {SHAPES}, color in {COLORS}, size in (0, 1]")

    @property
    def bbox(self) -> Box:
        (x, y), r = self.center, self.size / 2
        return (x - r, y - r, x + r, y + r)

    @property
    def category(self) -> str:
        """The POPE/MME object category: coloured shape, e.g. "red circle" (len(SHAPES) * len(COLORS) of them)."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Background:
    """A texture blending two low-saturation tones: pixel = (1 - w) * tones[0] + w * tones[1], w in [0, 1].
    kind in TEXTURES; period: pattern period (normalised units); angle: radians; seed: for `noise` and `dots`."""

    kind: str
    tones: tuple[tuple[int, int, int], tuple[int, int, int]]
    period: float
    angle: float
    seed: int

    def __post_init__(self):
        if self.kind not in TEXTURES or self.period <= 0:
            raise ValueError(f"bad background {self}: kind in {TEXTURES}, period > 0")


@dataclass(frozen=True)
class Scene:
    """1 to 4 objects on a textured background."""

    objects: tuple[SceneObject, ...]
    background: Background

    def count(self, shape: str) -> int:
        """How many of its objects have this shape."""
        return sum(o.shape == shape for o in self.objects)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(SceneObject(o["shape"], o["color"], tuple(o["center"]), o["size"]) for o in d["objects"])
        bg = d["background"]
        tones = tuple(tuple(t) for t in bg["tones"])
        return cls(objects, Background(bg["kind"], tones, bg["period"], bg["angle"], bg["seed"]))


@dataclass(frozen=True)
class SamplerConfig:
    """Ranges of the sampler (normalised units). At 64 px, min_size 0.16 is a 10 px object."""

    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.16
    max_size: float = 0.28
    gap: float = 0.05  # free space between two objects' squares
    margin: float = 0.03  # free space between a square and the border
    relation_tol: float = 0.02  # a pair's relations must not change when an object moves this much
    gray_range: tuple[int, int] = (110, 180)  # grey level of the first tone; the second stays within ~109..180
    contrast_range: tuple[int, int] = (18, 36)  # grey-level difference of the two tones
    max_tint: int = 6  # per-channel colour tint of the background tones (keeps chroma low)
    max_tries: int = 500


def relative_position(box_a: Box, box_b: Box, threshold: float = 0.1) -> frozenset[str]:
    """GenEval's rule: relations of A to B from box centres, each offset shrunk by threshold * (sum of the two
    extents on that axis); a relation holds when its axis carries more than half of the shrunk offset's direction."""
    off = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    dims = [box_a[i + 2] - box_a[i] + box_b[i + 2] - box_b[i] for i in (0, 1)]
    revised = [math.copysign(max(abs(o) - threshold * d, 0.0), o) for o, d in zip(off, dims, strict=True)]
    if max(abs(r) for r in revised) < 1e-6:
        return frozenset()
    norm = math.hypot(*off)
    dx, dy = revised[0] / norm, revised[1] / norm
    rels = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return frozenset(r for r, holds in rels.items() if holds)


def stable_relations(a: SceneObject, b: SceneObject, tol: float) -> frozenset[str] | None:
    """Relations of a to b, or None when moving a by up to `tol` on both axes would change them."""
    rel = relative_position(a.bbox, b.bbox)
    for sx in (-tol, tol):
        for sy in (-tol, tol):
            x0, y0, x1, y1 = a.bbox
            if relative_position((x0 + sx, y0 + sy, x1 + sx, y1 + sy), b.bbox) != rel:
                return None
    return rel


def _fits(obj: SceneObject, placed: Sequence[SceneObject], cfg: SamplerConfig) -> bool:
    for other in placed:
        reach = (obj.size + other.size) / 2 + cfg.gap
        dx, dy = abs(obj.center[0] - other.center[0]), abs(obj.center[1] - other.center[1])
        if max(dx, dy) < reach or stable_relations(obj, other, cfg.relation_tol) is None:
            return False
    return True


def place_objects(
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str]],
    cfg: SamplerConfig = SamplerConfig(),
    accept: Callable[[tuple[SceneObject, ...]], bool] | None = None,
) -> tuple[SceneObject, ...]:
    """Place one object per (shape, color) spec at random non-overlapping positions with unambiguous pairwise
    relations; `accept` may reject a whole layout (e.g. to impose a relation). Raises RuntimeError when no layout
    is found in cfg.max_tries attempts."""
    for _ in range(cfg.max_tries):
        placed: list[SceneObject] = []
        for shape, color in specs:
            size = float(rng.uniform(cfg.min_size, cfg.max_size))
            lo, hi = cfg.margin + size / 2, 1 - cfg.margin - size / 2
            for _ in range(50):
                obj = SceneObject(shape, color, (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))), size)
                if _fits(obj, placed, cfg):
                    placed.append(obj)
                    break
            else:
                break
        layout = tuple(placed)
        if len(layout) == len(specs) and (accept is None or accept(layout)):
            return layout
    raise RuntimeError(f"no layout found for {list(specs)} in {cfg.max_tries} tries; relax SamplerConfig")


def sample_background(rng: np.random.Generator, cfg: SamplerConfig = SamplerConfig()) -> Background:
    """A random texture in two low-saturation tones (never confusable with a palette colour)."""
    gray = int(rng.integers(cfg.gray_range[0], cfg.gray_range[1] + 1))
    contrast = int(rng.integers(cfg.contrast_range[0], cfg.contrast_range[1] + 1))
    second = gray + contrast if gray + contrast <= cfg.gray_range[1] else gray - contrast
    tint = rng.integers(-cfg.max_tint, cfg.max_tint + 1, size=3)
    tones = tuple(tuple(int(np.clip(g + t, 0, 255)) for t in tint) for g in (gray, second))
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    period = float(rng.uniform(0.06, 0.2)) if kind != "gradient" else 1.0
    return Background(kind, tones, period, float(rng.uniform(0, math.pi)), int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, cfg: SamplerConfig = SamplerConfig()) -> Scene:
    """A random scene: 1..4 objects of random shapes and colours (a shape/colour may repeat) on a random texture."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    specs = [(SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]) for _ in range(n)]
    return Scene(place_objects(rng, specs, cfg), sample_background(rng, cfg))
