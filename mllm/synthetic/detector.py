"""Exact detector for the synthetic domain and GenEval-style scoring of one image against one metadata entry.

Detection: pixels are foreground when they are saturated or very dark/light in CIELAB (backgrounds are mid-grey,
low-chroma tones by construction); the foreground splits into 8-connected components and specks are dropped. A
component's colour is the nearest palette colour to the median Lab value of its interior (rejected when too far).
Its coverage map (each pixel's position between the surrounding background colour and the object colour, luma
weighted) is cut at one half, cropped to its box and resampled to a square grid; the shape is the nearest of a bank
of templates (each shape sharp and blurred), rejected when too far or when the box is far from square. Positions
follow GenEval's rule on boxes (`scene.relative_position`). Built for decoded images: blur, JPEG, noise, colour shift.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from mllm.synthetic.render import PALETTE, draw_shape
from mllm.synthetic.scene import COLORS, SHAPES, Box, Scene, relative_position


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds in CIELAB units (L* in [0, 100]) and image fractions. Backgrounds: L* 43..76, chroma <= 10."""

    min_chroma: float = 28.0  # foreground when chroma is above this (lowest palette chroma: brown, 44) ...
    dark: float = 25.0  # ... or L* below this (black: 4) ...
    light: float = 92.0  # ... or L* above this (white: 98)
    min_area: float = 0.004  # drop components smaller than this fraction of the image
    max_color_distance: float = 45.0  # dE76 from the median colour to the nearest palette colour
    max_shape_distance: float = 0.3  # mean |mask - template| on the template grid
    max_aspect: float = 1.6  # objects fill a square: reject boxes with a longer/shorter side ratio beyond this
    luma_weight: float = 4.0  # weight of L* in coverage estimates (JPEG/decoders keep luma sharper than chroma)
    template_size: int = 16
    template_blurs: tuple[float, ...] = (0.0, 0.05, 0.1)  # each shape matches its nearest blur level (sigma / size)


@dataclass(frozen=True)
class DetectedObject:
    """shape in SHAPES, color in COLORS; bbox (x0, y0, x1, y1), centroid (x, y) and area (fraction of the image)
    are normalised to [0, 1] like scene geometry."""

    shape: str
    color: str
    bbox: Box
    centroid: tuple[float, float]
    area: float


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 255] -> (..., 3) CIELAB (D65): L* in [0, 100], a*, b* roughly in [-128, 127]."""
    c = np.asarray(rgb, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)  # cached arrays are shared between calls
    return arr


@functools.cache
def _palette_lab() -> np.ndarray:
    return _frozen(rgb_to_lab(np.array([PALETTE[c] for c in COLORS])))  # (len(COLORS), 3)


def _template(shape: str, n: int, blur: float, supersample: int = 8) -> np.ndarray:
    """(n, n) coverage in [0, 1] of `shape` blurred by `blur` (fraction of its size, Gaussian sigma), cropped to
    its half-coverage box like `_measure` crops detections."""
    side, pad = n * supersample, n * supersample // 2
    big = Image.new("L", (side + 2 * pad,) * 2, 0)
    draw_shape(ImageDraw.Draw(big), shape, ((side + 2 * pad) / 2,) * 2, side / 2, 255)
    if blur > 0:
        big = big.filter(ImageFilter.GaussianBlur(blur * side))
    alpha = np.asarray(big, np.float32) / 255
    ys, xs = np.nonzero(alpha >= 0.5)
    crop = Image.fromarray(alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], "F")
    return np.asarray(crop.resize((n, n), Image.BOX))


@functools.cache
def _templates(n: int, blurs: tuple[float, ...]) -> np.ndarray:
    return _frozen(np.stack([[_template(s, n, b) for b in blurs] for s in SHAPES]))  # (len(SHAPES), len(blurs), n, n)


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image, or (H, W, 3) array (uint8 in [0, 255] or float in [0, 1]) -> (H, W, 3) float64 in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float64)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return arr.astype(np.float64) * (255 if arr.dtype.kind == "f" else 1)


def foreground_mask(lab: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """(H, W, 3) Lab -> (H, W) bool: pixels that belong to some object."""
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    return (chroma > cfg.min_chroma) | (lab[..., 0] < cfg.dark) | (lab[..., 0] > cfg.light)


def classify_color(lab: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> str | None:
    """(3,) Lab colour of one object -> nearest palette colour, or None when farther than max_color_distance."""
    dist = np.linalg.norm(_palette_lab() - lab, axis=1)
    k = int(np.argmin(dist))
    return COLORS[k] if dist[k] <= cfg.max_color_distance else None


def classify_shape(alpha: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> str | None:
    """(h, w) coverage in [0, 1] cropped to one object's bounding box -> nearest shape template, or None."""
    h, w = alpha.shape
    if max(h, w) > cfg.max_aspect * min(h, w):
        return None
    n = cfg.template_size
    crop = Image.fromarray(alpha.astype(np.float32), "F").resize((n, n), Image.BILINEAR)
    dist = np.abs(_templates(n, cfg.template_blurs) - np.asarray(crop)).mean(axis=(2, 3)).min(axis=1)
    k = int(np.argmin(dist))
    return SHAPES[k] if dist[k] <= cfg.max_shape_distance else None


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel (edge pixels blend with the background), or the mask if that erases it."""
    inner = ndimage.binary_erosion(mask)
    return inner if inner.sum() >= 0.3 * mask.sum() else mask


def _coverage(lab: np.ndarray, obj: np.ndarray, bg: np.ndarray, luma_weight: float) -> np.ndarray:
    """(h, w, 3) Lab pixels -> (h, w) in [0, 1]: position of each pixel on the line from bg to obj colour."""
    weight = np.array([luma_weight, 1.0, 1.0])
    axis = (obj - bg) * weight
    return np.clip((lab - bg) * weight @ axis / max(float(axis @ axis), 1e-6), 0, 1)


def _measure(lab: np.ndarray, labels: np.ndarray, k: int, box: tuple[slice, slice], cfg: DetectorConfig):
    """One component -> DetectedObject, or None when it is a speck or matches no colour/shape.
    The loose foreground mask is refined to pixels at least half covered by the object, which keeps corners and
    concavities under blur and JPEG chroma subsampling."""
    h, w = labels.shape
    pad = 3
    (y0, y1), (x0, x1) = [(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, (h, w), strict=True)]
    region, near = lab[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    mask = near == k
    if mask.sum() < max(4, cfg.min_area * h * w):
        return None
    grown = ndimage.binary_dilation(mask, iterations=2)
    ring = grown & (near == 0)
    obj = np.median(region[_core(mask)], axis=0)
    bg = np.median(region[ring] if ring.any() else lab[labels == 0], axis=0)
    alpha = _coverage(region, obj, bg, cfg.luma_weight) * grown  # (h', w'), zero beyond this object's neighbourhood
    ys, xs = np.nonzero(alpha >= 0.5)
    color = classify_color(obj, cfg)
    if len(ys) == 0 or color is None:
        return None
    shape = classify_shape(alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], cfg)
    if shape is None:
        return None
    bbox = (
        float(x0 + xs.min()) / w,
        float(y0 + ys.min()) / h,
        float(x0 + xs.max() + 1) / w,
        float(y0 + ys.max() + 1) / h,
    )
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    centroid = (float((alpha * gx).sum() / alpha.sum()) / w, float((alpha * gy).sum() / alpha.sum()) / h)
    return DetectedObject(shape, color, bbox, centroid, float(alpha.sum()) / (h * w))


def detect(image: Image.Image | np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[DetectedObject]:
    """Objects in one image, largest first. image: PIL image or (H, W, 3) array (uint8, or float in [0, 1])."""
    lab = rgb_to_lab(_as_rgb(image))
    labels, _ = ndimage.label(foreground_mask(lab, cfg), structure=np.ones((3, 3)))
    found = [_measure(lab, labels, k, box, cfg) for k, box in enumerate(ndimage.find_objects(labels), start=1)]
    return sorted((o for o in found if o is not None), key=lambda o: -o.area)


def judge_geneval(entry: dict, objects: Sequence[DetectedObject]) -> tuple[bool, str]:
    """GenEval's `evaluate` on detected objects. `include` needs >= count objects of the class (objects of the
    requested colour are taken first), all of that colour, and each in `position` relation to every object matched by
    the target group; `exclude` needs < count objects of the class. Returns (correct, reasons joined by newlines)."""
    by_class = {s: [o for o in objects if o.shape == s] for s in {o.shape for o in objects}}
    reasons: list[str] = []
    groups: list[list[DetectedObject] | None] = []
    for req in entry["include"]:
        cls, count, color = req["class"], req["count"], req.get("color")
        found = sorted(by_class.get(cls, []), key=lambda o: o.color != color)[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif color is not None and (n := sum(o.color == color for o in found)) < count:
            ok = False
            seen = ", ".join(
                f"{sum(o.color == c for o in found)} {c}" for c in COLORS if any(o.color == c for o in found)
            )
            reasons.append(f"expected {color} {cls}>={count}, found {n} {color}; and {seen}")
        if ok and "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                wrong = [relative_position(o.bbox, t.bbox) for o in found for t in groups[target]]
                wrong = [r for r in wrong if rel not in r]
                if wrong:
                    ok = False
                    reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(wrong[0]))} target")
        groups.append(found if ok else None)
    for req in entry.get("exclude", []):
        if (n := len(by_class.get(req["class"], []))) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def score_geneval(
    entry: dict, image: Image.Image | np.ndarray, cfg: DetectorConfig = DetectorConfig()
) -> tuple[bool, str]:
    """Judge one image against one GenEval-style metadata entry of the synthetic domain: (correct, reason)."""
    return judge_geneval(entry, detect(image, cfg))


def match_objects(scene: Scene, detections: Sequence[DetectedObject]) -> list[DetectedObject | None]:
    """For each scene object, the detection whose box centre is nearest its centre (within half its size)."""
    matched = []
    for obj in scene.objects:
        dist = [
            np.hypot((d.bbox[0] + d.bbox[2]) / 2 - obj.center[0], (d.bbox[1] + d.bbox[3]) / 2 - obj.center[1])
            for d in detections
        ]
        k = int(np.argmin(dist)) if dist else -1
        matched.append(detections[k] if k >= 0 and dist[k] < obj.size / 2 else None)
    return matched


def detection_accuracy(scenes: Sequence[Scene], detections: Sequence[Sequence[DetectedObject]]) -> dict[str, float]:
    """Accuracy in [0, 1] per attribute. count: scenes with exactly as many detections as objects; shape, color:
    objects whose matched detection has them; position: ordered object pairs whose GenEval relations match. Plus
    "shape_<shape>": the shape accuracy per true shape (SHAPES order; shapes no scene holds are left out), which
    shapes a decoder draws so that they are recognised."""
    hits = {"count": [], "shape": [], "color": [], "position": []}
    by_shape: dict[str, list[bool]] = {shape: [] for shape in SHAPES}
    for scene, dets in zip(scenes, detections, strict=True):
        matched = match_objects(scene, dets)
        hits["count"].append(len(dets) == len(scene.objects))
        for obj, det in zip(scene.objects, matched, strict=True):
            hits["shape"].append(det is not None and det.shape == obj.shape)
            hits["color"].append(det is not None and det.color == obj.color)
            by_shape[obj.shape].append(hits["shape"][-1])
        for i, (a, da) in enumerate(zip(scene.objects, matched, strict=True)):
            for b, db in zip(scene.objects[i + 1 :], matched[i + 1 :], strict=True):
                same = da is not None and db is not None
                hits["position"].append(
                    same and relative_position(da.bbox, db.bbox) == relative_position(a.bbox, b.bbox)
                )
    hits |= {f"shape_{k}": v for k, v in by_shape.items() if v}
    return {k: float(np.mean(v)) if v else 1.0 for k, v in hits.items()}


def reconstruct_and_detect(tokenizer, images, scenes: Sequence[Scene], batch_size: int = 64):
    """What the exact detector still reads after a tokenizer's encode -> decode: images (N, 3, H, W) in [-1, 1] of
    `scenes` -> (`detection_accuracy`: count, shape, color, position and shape_<shape>;
    reconstructions (N, 3, H, W) clamped to [-1, 1]; PIL reconstructions). The ceiling decoding puts on generation."""
    import torch

    from semhitok.runtime import to_pil

    device = next(tokenizer.parameters()).device
    with torch.no_grad():
        recon = torch.cat([tokenizer.decode(tokenizer.encode(chunk.to(device))).clamp(-1, 1).cpu()
                           for chunk in images.split(batch_size)])  # fmt: skip
    pil = [to_pil(x) for x in recon]
    return detection_accuracy(scenes, [detect(im) for im in pil]), recon, pil
