"""Image data layer: `load_image` on every kind of awkward file (made here in tmp_path), datasets that skip and count
bad files (also across DataLoader workers), JSONL / LLaVA validation errors, and COCO on the real shared data."""

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data import CocoDataset, LlavaDataset, LlavaFormatError, load_llava, parse_sample, placeholder_issues
from semhitok.runtime import (
    BadItem,
    ImageFolderDataset,
    ImageLoadError,
    JsonlImageDataset,
    SkipCounter,
    collate_skip_bad,
    load_image,
    to_pil,
    to_tensor,
)
from semhitok.runtime.data import to_rgb

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def close(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def half_red_half_blue(w=40, h=20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    return img


# ---------------------------------------------------------------- bad files


def noise(size=30) -> Image.Image:  # 900 pixels: under SMALL_MAX_PIXELS
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated(path: Path) -> Path:
    noise().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def too_large(path: Path) -> Path:
    Image.new("RGB", (64, 64), RED).save(path)
    return path


BAD_FILES = {  # name → (maker, file name)
    "truncated_jpeg": (truncated, "t.jpg"),
    "truncated_png": (truncated, "t.png"),
    "random_bytes": (random_bytes, "r.jpg"),
    "empty": (empty, "e.jpg"),
    "too_large": (too_large, "big.png"),
}
SMALL_MAX_PIXELS = 1000  # 64x64 = 4096 pixels is "too large"; the good test images are 16x16


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_raises_clear_error(tmp_path, kind):
    make, name = BAD_FILES[kind]
    path = make(tmp_path / name)
    with pytest.raises(ImageLoadError) as e:
        load_image(path, 16, max_pixels=SMALL_MAX_PIXELS)
    assert e.value.path == str(path) and str(path) in str(e.value)
    expected = {
        "truncated_jpeg": "truncated",
        "truncated_png": "truncated",
        "random_bytes": "cannot identify",
        "empty": "empty file (0 bytes)",
        "too_large": "64x64 = 4,096 pixels, more than max_pixels",
    }
    assert expected[kind] in e.value.reason.lower()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageLoadError, match="dir.jpg"):
        load_image(tmp_path / "dir.jpg")


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w×h but holds almost no pixel data: only a header check can refuse it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused_from_header(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 5000, 5000)
    with pytest.raises(ImageLoadError, match=r"bomb.png.*5000x5000 = 25,000,000 pixels"):
        load_image(path, max_pixels=1_000_000)


# ---------------------------------------------------------------- modes and orientation


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise for display: its left edge becomes the top
    half_red_half_blue().save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (20, 40)
    assert close(img.getpixel((10, 5)), RED, 30) and close(img.getpixel((10, 35)), BLUE, 30)


def test_grayscale_and_alpha_modes(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "l.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")  # black, fully transparent
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "rgba.png")  # half-transparent red
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (100, 100, 100)
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == WHITE
    assert close(load_image(tmp_path / "rgba.png").getpixel((0, 0)), (255, 127, 127), 2)


@pytest.mark.parametrize("transparent", [True, False])
def test_palette(tmp_path, transparent):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    img.paste(1, (0, 0, 4, 8))
    img.save(tmp_path / "p.png", **({"transparency": 0} if transparent else {}))
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == RED
    assert out.getpixel((7, 0)) == (WHITE if transparent else BLACK)


def test_cmyk_jpeg_colours(tmp_path):
    colour = (200, 30, 30)
    Image.new("RGB", (16, 16), colour).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert close(load_image(tmp_path / "cmyk.jpg").getpixel((8, 8)), colour, 20)


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert [img.getpixel((x, 0)) for x in range(3)] == [BLACK, (128, 128, 128), WHITE]


def test_other_high_range_modes():
    big_endian = Image.frombytes("I;16B", (1, 1), np.array([32896], ">u2").tobytes())
    assert to_rgb(big_endian).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.full((1, 1), 0.5, np.float32))).getpixel((0, 0)) == (128, 128, 128)


# ---------------------------------------------------------------- protocol and tensors


def test_resize_short_side_and_centre_crop(tmp_path):
    half_red_half_blue(40, 20).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", 10)  # → 20x10, crop columns 5..14: left half red, right half blue
    assert img.size == (10, 10)
    assert close(img.getpixel((1, 5)), RED, 30) and close(img.getpixel((8, 5)), BLUE, 30)
    assert load_image(tmp_path / "a.png", 30).size == (30, 30)  # upscaling follows the same protocol


def test_to_tensor_round_trip():
    img = noise(12)
    x = to_tensor(img)
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(img))
    assert to_tensor(Image.new("RGB", (1, 1), (0, 255, 0))).flatten().tolist() == [-1.0, 1.0, -1.0]
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (2, 2)))


# ---------------------------------------------------------------- datasets


@pytest.fixture
def image_folder(tmp_path):
    """root/cat: 3 good (one nested); root/dog: 1 good + one of each bad kind; plus files that are not items."""
    root = tmp_path / "root"
    for rel in ["cat/a.png", "cat/b.jpg", "cat/sub/c.png", "dog/d.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), RED).save(root / rel)
    for make, name in BAD_FILES.values():
        make(root / "dog" / f"bad_{name}")
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16)).save(root / "loose.png")  # no class folder: left out
    return root


def test_image_folder_dataset(image_folder):
    ds = ImageFolderDataset(image_folder, 8, max_pixels=SMALL_MAX_PIXELS)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 + len(BAD_FILES)
    assert ds.targets == [0, 0, 0] + [1] * (1 + len(BAD_FILES))
    assert [Path(p).name for p in ds.paths[:3]] == ["a.png", "b.jpg", "c.png"]
    ok, bad = ds.scan()
    assert len(ok) == 4 and sorted(Path(b.path).name for b in bad) == sorted(f"bad_{n}" for _, n in BAD_FILES.values())
    assert isinstance(ds[ok[-1]], dict) and isinstance(ds[bad[0].index], BadItem)


def test_flat_image_folder_is_unlabelled(tmp_path):
    for name in ("n01_cat.jpg", "n02_dog.png"):
        Image.new("RGB", (16, 16), RED).save(tmp_path / name)
    ds = ImageFolderDataset(tmp_path, 8)
    assert ds.classes == [] and ds.targets == [-1, -1] and ds[1]["label"] == -1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_and_counts_bad_files(image_folder, num_workers):
    ds = ImageFolderDataset(image_folder, 8, max_pixels=SMALL_MAX_PIXELS)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skip_bad)
    counter, labels = SkipCounter(), []
    for batch in loader:
        counter.update(batch)
        if batch["batch_size"]:
            assert batch["image"].shape == (batch["batch_size"], 3, 8, 8)
            labels += batch["label"].tolist()
    assert sorted(labels) == [0, 0, 0, 1]
    assert counter.num_ok == 4 and counter.num_skipped == len(BAD_FILES)
    assert f"skipped {len(BAD_FILES)} of {len(ds)} items" in counter.summary()


def test_collate_all_bad_gives_empty_batch():
    batch = collate_skip_bad([BadItem(0, "x.jpg", "r"), BadItem(1, "y.jpg", "r")])
    assert batch["batch_size"] == 0 and batch["num_skipped"] == 2
    SkipCounter().update(batch)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty", 8)


def test_jsonl_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), RED).save(tmp_path / "img" / "a.png")
    lines = [{"image": "img/a.png", "caption": "red"}, {"image": str(tmp_path / "img" / "a.png"), "caption": "abs"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = JsonlImageDataset(tmp_path / "d.jsonl", 8)
    assert len(ds) == 2 and ds[0]["caption"] == "red" and ds[1]["image"].shape == (3, 8, 8)
    rooted = JsonlImageDataset(tmp_path / "d.jsonl", 8, root=tmp_path / "other")
    assert rooted.paths == [tmp_path / "other" / "img/a.png", tmp_path / "img" / "a.png"]  # absolute paths stay


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": "y"\n', r"d\.jsonl:3: invalid JSON"),
        ('{"image": "a.png"}\n', r"d\.jsonl:1: missing key\(s\) \['caption'\]"),
        ("[1, 2]\n", r"d\.jsonl:1: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, text, match):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(ValueError, match=match):
        JsonlImageDataset(tmp_path / "d.jsonl", 8)


# ---------------------------------------------------------------- LLaVA


def conv(*roles_values):
    return [{"from": r, "value": v} for r, v in roles_values]


GOOD = {"id": "s0", "image": "a.png", "conversations": conv(("human", "<image>\nWhat?"), ("gpt", "Red."))}


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"image": "a.png", "conversations": []}, r"sample 3: missing key 'id'"),
        ({"id": 7}, r"sample 3 \(id 7\): missing key 'conversations'"),
        ({"id": "x", "conversations": []}, "non-empty list"),
        ({"id": "x", "conversations": conv(("system", "hi"), ("gpt", "a"))}, r"turn 0 has unknown role 'system'"),
        (
            {"id": "x", "conversations": conv(("human", "a"), ("human", "b"))},
            r"'x'\): turn 1 is from 'human' but 'gpt'",
        ),
        ({"id": "x", "conversations": conv(("human", "a"), ("gpt", "b"), ("human", "c"))}, "must end with a 'gpt'"),
        ({"id": "x", "conversations": [{"from": "human"}]}, "turn 0 must be an object with 'from' and 'value'"),
        ({"id": "x", "image": ["a", "b"], "conversations": conv(("human", "a"), ("gpt", "b"))}, "path string"),
    ],
)
def test_llava_validation_errors(sample, match):
    with pytest.raises(LlavaFormatError, match=match):
        parse_sample(sample, 3)


def test_llava_file_and_placeholders(tmp_path):
    samples = [
        GOOD,
        {"id": "text", "conversations": conv(("human", "Hi"), ("gpt", "Hello"))},
        {"id": "none", "image": "a.png", "conversations": conv(("human", "What?"), ("gpt", "x"))},
        {"id": "two", "image": "a.png", "conversations": conv(("human", "<image><image>"), ("gpt", "x"))},
        {"id": "stray", "conversations": conv(("human", "<image> hi"), ("gpt", "x"))},
        {"id": "bad", "image": "missing.png", "conversations": GOOD["conversations"]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(samples))
    loaded = load_llava(tmp_path / "llava.json")
    assert [(i.id, i.num_placeholders) for i in placeholder_issues(loaded)] == [("none", 0), ("two", 2), ("stray", 1)]
    Image.new("RGB", (16, 16), RED).save(tmp_path / "a.png")
    ds = LlavaDataset(loaded, tmp_path, 8)
    assert ds[0]["image"].shape == (3, 8, 8) and ds[0]["turns"][1].text == "Red."
    assert ds[1]["image"] is None and isinstance(ds[5], BadItem)
    (tmp_path / "broken.json").write_text(json.dumps([GOOD, {"id": "q1", "conversations": conv(("gpt", "x"))}]))
    with pytest.raises(LlavaFormatError, match=r"broken\.json: sample 1 \(id 'q1'\)"):
        load_llava(tmp_path / "broken.json")


@pytest.mark.parametrize("cut", [-30, -1])  # inside a string; just before the closing bracket
def test_truncated_llava_json_names_the_file_and_position(tmp_path, cut):
    """#11: a LLaVA .json cut short (interrupted download or copy) is one line naming the file and position."""
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([GOOD, GOOD])[:cut])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: invalid JSON at line 1, column \d+: .*truncated\?\)$"):
        load_llava(path)
    path.write_text('[{"id": "a",\n "conversations": []\n {"id": "b"}]')  # a missing comma, not a truncation
    with pytest.raises(ValueError, match=r"llava\.json: invalid JSON at line 3, column 2: Expecting ',' delimiter$"):
        load_llava(path)


# ---------------------------------------------------------------- COCO (real shared data)


def test_coco_dataset_on_shared_data():
    ann = SHARED_DATA / "real" / "coco-491" / "annotations.jsonl"
    if not ann.is_file():
        pytest.skip(f"shared data not found at {ann} (it lives beside the project on developer machines and in CI)")
    assert len(CocoDataset(ann, 32)) == 491
    assert len(CocoDataset(ann, 32, require_objects=True)) == 410
    ds = CocoDataset(ann, 32, require_captions=True)
    assert len(ds) == 363
    batch = collate_skip_bad([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["num_skipped"] == 0
    assert len(batch["captions"][0]) == 5 and all(isinstance(c, str) for c in batch["captions"][0])
    assert batch["coco_id"].dtype == torch.int64 and isinstance(batch["objects"][0], list)
