"""Image loading and generic image datasets.

`load_image` is the one function every dataset in the project uses to read an image: EXIF orientation, any PIL
mode to 8-bit RGB, a decompression-bomb limit, and the evaluation protocol of DESIGN.md §3.3 (resize the short side,
centre crop). Bad files raise `ImageLoadError`.

Datasets never crash mid-epoch on a bad file: `__getitem__` logs a warning and returns a `BadItem`, and
`collate_skip_bad` drops those and reports them in the batch (`num_skipped`, `skipped`), so the count survives
multi-worker `DataLoader`s. `SkipCounter` sums them in the training loop; `scan()` validates a dataset upfront.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadItem",
    "ImageFolderDataset",
    "ImageLoadError",
    "JsonlImageDataset",
    "SkipCounter",
    "collate_skip_bad",
    "load_image",
    "read_json",
    "read_jsonl",
    "resize_center_crop",
    "to_pil",
    "to_rgb",
    "to_tensor",
]

logger = logging.getLogger(__name__)

# Same as PIL's default warning threshold, so PIL's own (global, mutable) check never fires first at the default.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
WHITE = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(Exception):
    """An image file that cannot be used: missing, not an image, corrupt, truncated or too large."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)


# ---------------------------------------------------------------- loading


def load_image(
    path: str | os.PathLike,
    size: int | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Read an image file as 8-bit RGB, upright (EXIF orientation applied).

    size: if given, resize the short side to `size` (bicubic, antialiased) and centre-crop to size×size.
    max_pixels: refuse images with more than this many pixels, checked from the header before decoding (None: off).
    background: colour that transparent pixels are composited onto (see `to_rgb`).
    Raises ImageLoadError naming the file and the reason.
    """
    try:
        with Image.open(path) as img:
            _check_pixels(img, max_pixels, path)
            img.load()  # decode now, so that truncated / corrupt data fails here
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img, background)
    except ImageLoadError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on corrupt files
        raise ImageLoadError(path, _reason(path, e)) from e
    return img if size is None else resize_center_crop(img, size)


def _reason(path: str | os.PathLike, e: Exception) -> str:
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    return f"{type(e).__name__}: {e}"


def _check_pixels(img: Image.Image, max_pixels: int | None, path: str | os.PathLike) -> None:
    """Runs on the header only (before decoding), so a decompression bomb is refused without allocating it."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(path, f"empty image ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(path, f"image is {w}x{h} = {w * h:,} pixels, more than max_pixels={max_pixels:,}")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode → 8-bit RGB.

    Transparency is composited onto `background` (white by default): dropping alpha would expose whatever colour the
    encoder left in fully transparent pixels (often black, so a black logo on transparency becomes a black square);
    white is how such images are shown on web pages and documents. 16-bit grayscale (I;16*, and I, read as 16-bit)
    is scaled to 8 bit by /257 (PIL's own convert clips it to 255). CMYK uses PIL's conversion (Adobe-inverted JPEGs are handled by the decoder;
    embedded ICC profiles are not applied).
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if img.mode == "F":
        return _gray_to_rgb(_float_to_8bit_range(np.asarray(img, dtype=np.float64)))
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        return _composite(img.convert("RGBA"), background)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _float_to_8bit_range(a: np.ndarray) -> np.ndarray:
    """Mode F has no fixed range: [0, 1] if every value lies there, else PIL's [0, 255]. NaN → 0."""
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    return a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) float in [0, 255] (clipped) → RGB image."""
    g = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), mode="RGB")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic, antialiased), then centre-crop size×size (torchvision's rounding)."""
    w, h = img.size
    if min(w, h) != size:
        new = (size, max(size, int(size * h / w))) if w <= h else (max(size, int(size * w / h)), size)
        img = img.resize(new, Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float32 in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r} (use load_image or to_rgb)")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8
    return x.float() / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [-1, 1] (clamped) → RGB PIL image. Inverse of `to_tensor`."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(x.shape)}")
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).numpy(), mode="RGB")


# ---------------------------------------------------------------- skipping bad items


@dataclass(frozen=True)
class BadItem:
    """What a dataset returns in place of an item whose image failed to load (picklable, crosses worker processes)."""

    index: int
    path: str
    reason: str


def collate_skip_bad(batch: Sequence[dict | BadItem]) -> dict[str, Any]:
    """Collate dataset items, dropping `BadItem`s.

    Returns a dict with every item key (tensors stacked to (B, ...), numbers → (B,) tensor, anything else a list),
    plus `batch_size` (B, good items), `num_skipped` (int) and `skipped` (list[BadItem]).
    If every item is bad the batch holds only `batch_size=0`, `num_skipped` and `skipped`.
    """
    good = [b for b in batch if not isinstance(b, BadItem)]
    skipped = [b for b in batch if isinstance(b, BadItem)]
    out = {k: _collate_values([b[k] for b in good]) for k in (good[0] if good else {})}
    return {**out, "batch_size": len(good), "num_skipped": len(skipped), "skipped": skipped}


def _collate_values(values: list) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return torch.tensor(values)
    return values


@dataclass
class SkipCounter:
    """Sums skipped items over batches from `collate_skip_bad` (counts travel in the batch, so workers are fine)."""

    num_ok: int = 0
    num_skipped: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # path → reason of the last failure

    def update(self, batch: dict[str, Any]) -> None:
        self.num_ok += batch["batch_size"]
        self.num_skipped += batch["num_skipped"]
        self.reasons.update({b.path: b.reason for b in batch["skipped"]})

    def summary(self, max_files: int = 10) -> str:
        """One line: how many items were skipped and the first `max_files` files with their reasons."""
        total = self.num_ok + self.num_skipped
        head = f"skipped {self.num_skipped} of {total} items ({len(self.reasons)} distinct files)"
        files = [f"{p} ({r})" for p, r in list(self.reasons.items())[:max_files]]
        more = len(self.reasons) - len(files)
        return head + (": " + "; ".join(files) if files else "") + (f"; ... {more} more" if more > 0 else "")


# ---------------------------------------------------------------- datasets


class _ImageFileDataset(torch.utils.data.Dataset):
    """Base: a list of image paths; subclasses add per-item fields with `_fields(index)`."""

    def __init__(self, paths: list[Path], size: int | None, max_pixels: int | None):
        self.paths, self.size, self.max_pixels = paths, size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def _fields(self, index: int) -> dict[str, Any]:
        return {}

    def __getitem__(self, index: int) -> dict[str, Any] | BadItem:
        """{"image": (3, size, size) float32 in [-1, 1], "path": str, **fields}, or a BadItem (warning logged)."""
        path = self.paths[index]
        try:
            image = to_tensor(load_image(path, self.size, max_pixels=self.max_pixels))
        except ImageLoadError as e:
            logger.warning("skipping item %d: %s", index, e)
            return BadItem(index, str(path), e.reason)
        return {"image": image, "path": str(path), **self._fields(index)}

    def scan(self) -> tuple[list[int], list[BadItem]]:
        """Decode every image once (no resize). Returns (indices of good items, BadItems); logs nothing per file."""
        ok, bad = [], []
        for i, path in enumerate(self.paths):
            try:
                load_image(path, None, max_pixels=self.max_pixels)
                ok.append(i)
            except ImageLoadError as e:
                bad.append(BadItem(i, str(path), e.reason))
        return ok, bad


def _has_extension(name: str, extensions: Iterable[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def _list_images(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Recursive, follows symlinked folders, sorted by relative path (deterministic across machines)."""
    found = [
        Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files if _has_extension(f, extensions)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class ImageFolderDataset(_ImageFileDataset):
    """Images under `root/<class>/**`; class index = position of the top-level folder name in sorted `classes`.

    Items: {"image": (3, size, size) float32 in [-1, 1], "label": int, "path": str}, or a BadItem.
    A flat folder (images directly in `root`, no class sub-folders) is an unlabelled set: label -1, `classes` empty.
    Where both exist, files directly in `root` have no class and are left out (with a warning).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        paths = _list_images(root, extensions)
        loose = [p for p in paths if p.parent == root]
        if loose and len(loose) == len(paths):  # flat, unlabelled folder
            self.classes, self.class_to_idx = [], {}
            super().__init__(paths, size, max_pixels)
            self.targets = [-1] * len(paths)
            return
        if loose:
            logger.warning("%d image files directly in %s have no class folder and are left out", len(loose), root)
        paths = [p for p in paths if p.parent != root]
        if not paths:
            raise ValueError(f"no image files ({', '.join(extensions)}) in class sub-folders of {root}")
        super().__init__(paths, size, max_pixels)
        self.targets = [self.class_to_idx[p.relative_to(root).parts[0]] for p in paths]

    def _fields(self, index: int) -> dict[str, Any]:
        return {"label": self.targets[index]}


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (e.g. a LLaVA .json list) -> its value. Errors are one line naming the file, line and column;
    a file that ends inside the value (a truncated download or copy) says so."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")  # the parser hit the end
        hint = "; the file ends early (truncated?)" if truncated else ""
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg.removesuffix(' starting at')}{hint}") from None


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """JSON lines → [(1-based line number, object)]; blank lines are ignored. Errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    return records


class JsonlImageDataset(_ImageFileDataset):
    """JSON lines, one record per image: `image_key` holds the path, `text_keys` are copied into each item.

    Relative image paths are resolved against `root`, or the folder of the JSONL file when `root` is None.
    Items: {"image": (3, size, size) float32 in [-1, 1], "path": str, <text_keys>...}, or a BadItem.
    `keep(record) -> bool` filters records (e.g. only those with captions).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        size: int | None,
        image_key: str = "image",
        text_keys: Sequence[str] = ("caption",),
        root: str | os.PathLike | None = None,
        *,
        keep: Callable[[dict], bool] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        path = Path(path)
        records = read_jsonl(path)
        for lineno, rec in records:
            _check_keys(rec, image_key, text_keys, f"{path}:{lineno}")
        records = [r for _, r in records if keep is None or keep(r)]
        if not records:
            raise ValueError(f"{path}: no records" + (" left after filtering" if keep is not None else ""))
        base = Path(root) if root is not None else path.parent
        self.records = [{k: r[k] for k in text_keys} for r in records]
        super().__init__([base / r[image_key] for r in records], size, max_pixels)

    def _fields(self, index: int) -> dict[str, Any]:
        return dict(self.records[index])


def _check_keys(rec: dict, image_key: str, text_keys: Sequence[str], where: str) -> None:
    missing = [k for k in (image_key, *text_keys) if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; the record has {sorted(rec)}")
    if not isinstance(rec[image_key], str) or not rec[image_key]:
        raise ValueError(f"{where}: {image_key!r} must be a non-empty path string, got {rec[image_key]!r}")
