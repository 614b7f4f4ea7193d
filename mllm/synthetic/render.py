"""Deterministic renderer of synthetic scenes at any resolution.

A scene is drawn at `supersample` times the target size (background texture evaluated at every pixel centre,
objects as Pillow polygons) and box-downsampled, which anti-aliases edges. Same scene, size and supersample give
byte-identical images: nothing here draws random numbers except from the background's own seed.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from mllm.synthetic.scene import Background, Scene

# sRGB colours pairwise far apart in CIELAB (min dE76 43: blue/purple); all have chroma >= 44 (brown) except black
# (L* 4) and white (L* 98), so none can be mistaken for a background tone (chroma <= 10, L* 43..76).
PALETTE = MappingProxyType(
    {
        "red": (220, 30, 35),
        "orange": (255, 140, 0),
        "yellow": (250, 225, 20),
        "green": (30, 160, 60),
        "blue": (20, 100, 235),
        "purple": (150, 30, 175),
        "pink": (255, 130, 200),
        "brown": (135, 75, 25),
        "black": (15, 15, 15),
        "white": (250, 250, 250),
    }
)


def _star(points: int = 5, inner: float = 0.48) -> list[tuple[float, float]]:
    """Alternating outer (radius 1) and inner vertices, first tip up."""
    radii = [1 if k % 2 == 0 else inner for k in range(2 * points)]
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _cross(a: float = 0.34) -> list[tuple[float, float]]:
    """A plus sign whose arms have half-width `a`."""
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _fill_box(poly: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon so that its bounding box is exactly [-1, 1]^2 (objects fill their square)."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    sx, sy = 2 / (max(xs) - min(xs)), 2 / (max(ys) - min(ys))
    return tuple((-1 + (x - min(xs)) * sx, -1 + (y - min(ys)) * sy) for x, y in poly)


# Outlines in [-1, 1]^2 (y down); the circle is drawn as an ellipse.
POLYGONS = MappingProxyType(
    {
        "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
        "triangle": ((0, -1), (1, 1), (-1, 1)),
        "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
        "star": _fill_box(_star()),
        "cross": _fill_box(_cross()),
    }
)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], half: float, fill) -> None:
    """Draw `shape` filling the square of half-side `half` (pixels) centred at `center` (pixels)."""
    cx, cy = center
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon([(cx + x * half, cy + y * half) for x, y in POLYGONS[shape]], fill=fill)


def _value_noise(seed: int, cells: int, n: int) -> np.ndarray:
    """(n, n) smooth noise in [0, 1]: a (cells + 1)^2 lattice of random values, bicubically upsampled."""
    lattice = np.random.default_rng(seed).random((cells + 1, cells + 1), dtype=np.float32)
    return np.clip(np.asarray(Image.fromarray(lattice, "F").resize((n, n), Image.BICUBIC)), 0, 1)


def texture_weights(bg: Background, n: int) -> np.ndarray:
    """(n, n) float32 in [0, 1]: the blend weight of tones[1] at every pixel centre of an n x n image."""
    if bg.kind == "noise":
        cells = max(2, round(1 / bg.period))
        return 0.65 * _value_noise(bg.seed, cells, n) + 0.35 * _value_noise(bg.seed + 1, 4 * cells, n)
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n  # row coordinate v, column coordinate u, in (0, 1)
    c, s = math.cos(bg.angle), math.sin(bg.angle)
    along, across = u * c + v * s, v * c - u * s  # rotated coordinates
    if bg.kind == "stripes":
        return np.floor(along * (2 / bg.period)) % 2
    if bg.kind == "checker":
        return (np.floor(along / bg.period) + np.floor(across / bg.period)) % 2
    if bg.kind == "gradient":
        return (along - along.min()) / (along.max() - along.min())
    if bg.kind == "dots":
        du, dv = (along / bg.period) % 1 - 0.5, (across / bg.period) % 1 - 0.5
        return (du * du + dv * dv < 0.3**2).astype(np.float32)
    raise ValueError(f"unknown background kind {bg.kind!r}")


def render_background(bg: Background, n: int) -> Image.Image:
    """n x n RGB texture: tones[0] blended into tones[1] by `texture_weights`."""
    weight = Image.fromarray(np.round(texture_weights(bg, n) * 255).astype(np.uint8), "L")
    return Image.composite(Image.new("RGB", (n, n), bg.tones[1]), Image.new("RGB", (n, n), bg.tones[0]), weight)


def render(scene: Scene, size: int = 256, supersample: int = 4) -> Image.Image:
    """RGB image of `size` x `size` pixels (any size >= 8), anti-aliased by `supersample` x supersampling."""
    if size < 8 or supersample < 1:
        raise ValueError(f"size must be >= 8 and supersample >= 1, got {size}, {supersample}")
    n = size * supersample
    img = render_background(scene.background, n)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_shape(draw, obj.shape, (obj.center[0] * n, obj.center[1] * n), obj.size * n / 2, PALETTE[obj.color])
    return img.resize((size, size), Image.BOX) if supersample > 1 else img
