"""What the web demo computes, without a browser: pure functions from an `Inference` and plain values (paths, PIL
images, numbers) to PIL images, numbers and text. `mllm.app.ui` wires them into gradio; tests call them directly.

    load_upload(path, size)            an uploaded file -> RGB image at the tokenizer's size (AppError if unusable)
    example_images(size)               synthetic scenes (+ real images from ../shared/data when present)
    stream_answer(run, image, ...)     a chat answer, yielded as it grows token by token
    generate(run, prompt, settings)    images with the exact seed of each
    score(prompt, images)              the synthetic detector's verdict on a GenEval-style prompt
    explore(run, image)                reconstruction, semantic-code map, semantic-only decode, PSNR
    patch_at / highlight               the (i, j) codes of a clicked patch and the patches sharing its i
"""

from __future__ import annotations

import colorsys
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mllm.sampling import (
    ChatSession,
    Inference,
    Progress,
    SamplingConfig,
    generate_images,
    generate_texts,
)
from mllm.synthetic import COLORS, RELATIONS, SHAPES, geneval_prompt, render, sample_scene, score_geneval
from semhitok import TokenGrid
from semhitok.runtime import ImageLoadError, load_image, to_pil, to_tensor

MAX_UPLOAD_BYTES = 20 * 2**20  # larger files are refused before they are read
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the header, before decoding
EXAMPLES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"  # ../shared/data on dev machines
REAL_EXAMPLES = ("imagenet-sample-256/n01443537_goldfish.jpg", "imagenet-sample-256/n01491361_tiger_shark.jpg")
VIEW_SIDE = 256  # images are shown at least this large (nearest-neighbour upscaling keeps the patches sharp)
MAX_IMAGES = 8  # per Generate click
FADE = 0.3  # how much colour a patch not sharing the clicked patch's semantic code keeps


Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # x, y (B, 3, H, W) in [-1, 1] -> (B,), e.g. PSNR


class AppError(ValueError):
    """A bad upload or setting; the message is one line shown in the page."""


# ---------------------------------------------------------------------------------------------------- images


def load_upload(path: str | Path | None, size: int) -> Image.Image:
    """An uploaded file -> RGB image, short side resized to `size` and centre-cropped. AppError (one line) for no
    file, a file over MAX_UPLOAD_BYTES or MAX_UPLOAD_PIXELS, or one that is not a readable image."""
    if path is None:
        raise AppError("upload an image first (or pick an example)")
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_UPLOAD_BYTES:
        raise AppError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        return load_image(path, size, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageLoadError as err:
        raise AppError(f"cannot use {path.name}: {err.reason}") from None


def example_images(size: int, scenes: int = 4, seed: int = 0, real_dir: Path = EXAMPLES_DIR) -> list[Image.Image]:
    """`scenes` seeded synthetic scenes rendered at `size`, then the REAL_EXAMPLES found under `real_dir`."""
    rng = np.random.default_rng(seed)
    images = [render(sample_scene(rng), size) for _ in range(scenes)]
    real = [real_dir / name for name in REAL_EXAMPLES if (real_dir / name).is_file()]
    return images + [load_image(p, size) for p in real]


def view(image: Image.Image, side: int = VIEW_SIDE) -> Image.Image:
    """`image` upscaled by an integer factor (nearest) so that it is at least `side` pixels wide."""
    k = max(1, -(-side // image.width))
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


# ---------------------------------------------------------------------------------------------------- chat


def stream_answer(run: Inference, image: Image.Image | None, history: Sequence[tuple[str, str]], question: str,
                  cfg: SamplingConfig, template: str = "auto") -> Iterator[str]:  # fmt: skip
    """The answer to `question` after `history` about `image` (None: no image), yielded as it grows (one string per
    new token, each the whole answer so far). Sampling runs in a worker thread and stops at the next token when the
    caller stops reading. InferenceError (one line) for an empty or over-long question."""
    image_ids = None if image is None else encode_ids(run, image)
    session = ChatSession(run.model, run.tokenizer, image_ids, cfg, template, list(history))
    prompt, stops = session.prompt_ids(question), session.stop_ids()
    known = torch.arange(run.model.vocab.offset) < len(run.tokenizer)
    tokens: queue.Queue = queue.Queue()
    closed = threading.Event()  # the reader left (e.g. the page was closed): stop sampling, free the model

    def on_token(_: int, ids: list[int]) -> bool:
        tokens.put(list(ids))
        return closed.is_set()

    def work() -> None:
        try:
            tokens.put(generate_texts(run.model, [prompt], cfg, stops, known, on_token)[0].tolist())
        except Exception as err:  # handed to the caller's thread
            tokens.put(err)
        tokens.put(None)

    worker, last = threading.Thread(target=work, daemon=True), None
    worker.start()
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, Exception):
                raise item
            if (text := run.tokenizer.decode(item, skip_special_tokens=True).strip()) != last:
                yield text
            last = text
    finally:
        closed.set()
        worker.join()


def encode_ids(run: Inference, image: Image.Image) -> torch.Tensor:
    """RGB image at the tokenizer's size -> (1, h·w) image ids."""
    return run.model.vocab.to_ids(encode(run, image))


# ---------------------------------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class Generated:
    """One generated image and the seed that re-makes it alone (`--seed` of scripts/generate.py, --num-images 1)."""

    image: Image.Image
    seed: int


def generate(run: Inference, prompt: str, cfg: SamplingConfig, template: str = "auto",
             progress: Progress | None = None) -> list[Generated]:  # fmt: skip
    """cfg.num_images images of `prompt`; image n uses seed cfg.seed + n. AppError for an empty prompt or more than
    MAX_IMAGES images; InferenceError for a prompt too long for the context."""
    if not prompt.strip():
        raise AppError("write a prompt first")
    if cfg.num_images > MAX_IMAGES:
        raise AppError(f"at most {MAX_IMAGES} images per click, got {cfg.num_images}")
    grid = generate_images(run.model, [prompt], cfg, tokenizer=run.tokenizer, template=template, progress=progress)
    return [Generated(to_pil(x), cfg.seed + n) for n, x in enumerate(run.decode(grid).float().cpu())]


def sampling_settings(num_images: float, cfg_scale: float, schedule: str, temperature: float, top_k: float,
                      top_p: float, seed: float, max_new_tokens: int = 256) -> SamplingConfig:  # fmt: skip
    """SamplingConfig from the page's widgets (numbers arrive as floats); AppError names a bad value."""
    try:
        return SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              cfg_scale=float(cfg_scale), cfg_schedule=schedule, seed=int(seed),
                              num_images=int(num_images), max_new_tokens=int(max_new_tokens))  # fmt: skip
    except (TypeError, ValueError) as err:
        raise AppError(" ".join(str(err).split()).split(": got")[0]) from None


@lru_cache(maxsize=1)
def synthetic_entries() -> dict[str, dict]:
    """Every GenEval-style prompt of the synthetic domain (GENEVAL_TAGS' wording) -> its metadata entry."""
    entries: list[dict] = []
    colors: list[str | None] = [None, *COLORS]
    for s0, c0 in itertools.product(SHAPES, colors):
        entries.append({"tag": "colors" if c0 else "single_object", "include": [_req(s0, 1, c0)]})
    for s0, count in itertools.product(SHAPES, (2, 3, 4)):
        entries.append({"tag": "counting", "include": [_req(s0, count)], "exclude": [_req(s0, count + 1)]})
    for (s0, c0), (s1, c1) in itertools.permutations(itertools.product(SHAPES, colors), 2):
        if (c0 is None) == (c1 is None):
            entries.append({"tag": "color_attr" if c0 else "two_object", "include": [_req(s0, 1, c0), _req(s1, 1, c1)]})
    for s0, s1, rel in itertools.product(SHAPES, SHAPES, RELATIONS):
        entries.append({"tag": "position", "include": [_req(s0, 1), {**_req(s1, 1), "position": [rel, 0]}]})
    return {geneval_prompt(e["include"]): {**e, "prompt": geneval_prompt(e["include"])} for e in entries}


def _req(shape: str, count: int, color: str | None = None) -> dict:
    return {"class": shape, "count": count, **({"color": color} if color else {})}


def score(prompt: str, images: Sequence[Image.Image]) -> list[tuple[bool, str]]:
    """The exact detector's (correct, reason) per image for a synthetic GenEval-style prompt ("a photo of two red
    circles"); AppError for a prompt outside the synthetic domain or no images."""
    entry = synthetic_entries().get(" ".join(prompt.lower().split()))
    if entry is None:
        raise AppError(f"the detector scores synthetic prompts only, e.g. {next(iter(synthetic_entries()))!r}")
    if not images:
        raise AppError("generate images first")
    return [score_geneval(entry, image.convert("RGB")) for image in images]


# ---------------------------------------------------------------------------------------------------- explorer


@dataclass(frozen=True)
class Exploration:
    """What the tokenizer makes of one image. Images are RGB at the tokenizer's size; grid (h, w) codes."""

    image: Image.Image
    reconstruction: Image.Image
    semantic_only: Image.Image  # decoded with every texture code 0
    code_map: Image.Image  # (h, w) patches, one colour per semantic code, upscaled to the image size
    grid: TokenGrid  # (1, h, w)
    psnr: float  # dB, reconstruction vs image
    psnr_semantic: float  # dB, semantic-only decode vs image


def encode(run: Inference, image: Image.Image) -> TokenGrid:
    """RGB image at the tokenizer's size -> TokenGrid (1, h, w)."""
    x = to_tensor(image)[None].to(_device(run))  # (1, 3, H, W) in [-1, 1]
    return run.semhitok.encode(x)


def _device(run: Inference) -> torch.device:
    return next(run.semhitok.parameters()).device


def explore(run: Inference, image: Image.Image, psnr: Metric) -> Exploration:
    """Encode `image` (RGB at the tokenizer's size), decode it in full and with semantic codes only. `psnr` is
    `semhitok.metrics.psnr`, passed in by the caller (`mllm` imports only what `semhitok` exports, and metrics are
    not loaded by `import semhitok`)."""
    grid = encode(run, image)
    semantic_grid = TokenGrid(grid.semantic, torch.zeros_like(grid.texture))
    x = to_tensor(image)[None]
    full, semantic = (run.decode(g).float().cpu() for g in (grid, semantic_grid))  # (1, 3, H, W)
    return Exploration(image, to_pil(full[0]), to_pil(semantic[0]), code_map(grid.semantic[0].cpu().numpy(), image.size),
                       TokenGrid(grid.semantic.cpu(), grid.texture.cpu()), float(psnr(full, x)[0]),
                       float(psnr(semantic, x)[0]))  # fmt: skip


def code_colour(code: int) -> tuple[int, int, int]:
    """A distinct, stable colour per semantic code (golden-ratio hues, three lightness levels)."""
    hue = (code * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, (0.45, 0.6, 0.75)[code % 3], 0.75)
    return int(r * 255), int(g * 255), int(b * 255)


def code_map(semantic: np.ndarray, size: tuple[int, int], selected: tuple[int, int] | None = None) -> Image.Image:
    """semantic (h, w) codes -> an image of `size` (W, H) upscaled by `view`: one colour per code, patch borders
    drawn. With `selected` (row, col): the patches sharing its code keep their colour and are outlined (it the
    most), the others fade towards white."""
    h, w = semantic.shape
    cells = np.array([[code_colour(int(c)) for c in row] for row in semantic], dtype=np.uint8)  # (h, w, 3)
    same = semantic == semantic[selected] if selected is not None else np.zeros_like(semantic, dtype=bool)
    cells[~same] = (cells[~same] * FADE + 255 * (1 - FADE)).astype(np.uint8) if selected is not None else cells[~same]
    picture = view(Image.fromarray(cells).resize(size, Image.NEAREST))
    draw, (pw, ph) = ImageDraw.Draw(picture), (picture.width / w, picture.height / h)
    for k in range(1, max(h, w)):
        draw.line([(k * pw, 0), (k * pw, picture.height)], fill=(255, 255, 255), width=1)
        draw.line([(0, k * ph), (picture.width, k * ph)], fill=(255, 255, 255), width=1)
    for row, col in zip(*np.nonzero(same), strict=True):
        thick = 4 if (row, col) == tuple(selected) else 2
        draw.rectangle([col * pw, row * ph, (col + 1) * pw - 1, (row + 1) * ph - 1], outline=(0, 0, 0), width=thick)
    return picture


def patch_at(grid: TokenGrid, x: float, y: float, shown: tuple[int, int]) -> tuple[int, int, int, int]:
    """A click at pixel (x, y) of a picture of size `shown` (W, H) -> (row, col, i, j) of the patch under it."""
    h, w = grid.semantic.shape[-2:]
    row, col = min(int(y * h / shown[1]), h - 1), min(int(x * w / shown[0]), w - 1)
    return row, col, int(grid.semantic[0, row, col]), int(grid.texture[0, row, col])


def highlight(exploration: Exploration, x: float, y: float, shown: tuple[int, int]) -> tuple[Image.Image, str]:
    """The code map with only the patches sharing the clicked patch's semantic code i in colour, and a line naming
    the patch, its (i, j) and how many patches share i."""
    row, col, i, j = patch_at(exploration.grid, x, y, shown)
    semantic = exploration.grid.semantic[0].numpy()
    same = int((semantic == i).sum())
    picture = code_map(semantic, exploration.image.size, selected=(row, col))
    text = f"patch (row {row}, col {col}): semantic code i = {i}, texture code j = {j}; {same} patch(es) share i = {i}"
    return picture, text


__all__ = ["AppError", "Exploration", "Generated", "code_map", "example_images", "explore",
           "generate", "highlight", "load_upload", "patch_at", "sampling_settings", "score", "stream_answer"]  # fmt: skip
