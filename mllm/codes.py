"""Image code cache: encode a dataset's images ONCE with SemHiTok, so MLLM training never runs the tokenizer.

Layout of a cache folder (written by `extract_codes`, i.e. `scripts/extract_codes.py`):

    index.json                 tokenizer fingerprint (checkpoint path, config + weights hashes, K, m, h, w, image
                               size), the image list (keys, shard size), the complete shards with their sha256 and
                               skipped images, and when complete, the per-image map key -> [shard, row]
    shard-00000.safetensors    `semantic`, `texture`: (n, h, w) int16 (int32 when K or m > 32768); metadata "keys":
                               the JSON list of the n images' keys, row order

Image keys are the paths as the annotation file writes them (or relative to the folder), normalised
("./a//b.png" -> "a/b.png"), so a LLaVA json and a captions JSONL over the same images share one cache.
Shard s holds the images keys[s*S:(s+1)*S] of the sorted key list, minus the bad ones (skipped and counted, never a
crash). Every file is written to a hidden temp file and os.replace'd, and index.json lists a shard only after its file
is in place, so a killed run leaves nothing half-written that is ever read: re-running the same command verifies the
listed shards (sha256) and computes the rest. A cache is read only when complete, and only by a model whose SemHiTok
checkpoint has the same fingerprint (`CodeCache(dir, tokenizer=semhitok_dir)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from semhitok import SemHiTok, SemHiTokConfig, TokenGrid
from semhitok.runtime import (
    IMAGE_EXTENSIONS,
    BadItem,
    ImageLoadError,
    SkipCounter,
    collate_skip_bad,
    load_image,
    read_json,
    read_jsonl,
    to_tensor,
)

logger = logging.getLogger(__name__)

FORMAT = "semhitok-code-cache/1"
INDEX_NAME = "index.json"
SHARD_NAME = "shard-{:05d}.safetensors"
TOKENIZER_FILES = ("config.json", "model.safetensors")  # what SemHiTok.save_pretrained writes
REEXTRACT_HINT = "re-extract the codes with scripts/extract_codes.py --tokenizer <the model's SemHiTok folder>"


class CodeCacheError(ValueError):
    """A cache that is missing, incomplete, corrupt, or made with another tokenizer or image list."""


# ---------------------------------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class TokenizerFingerprint:
    """What the codes depend on. Two checkpoints give the same codes iff every field but `path` agrees."""

    path: str
    config_hash: str  # sha256 of the canonical JSON of the SemHiTokConfig (`fingerprint_dict`)
    weights_hash: str  # sha256 of model.safetensors
    K: int  # noqa: N815 (glossary name)
    m: int
    h: int
    w: int
    image_size: int

    def differences(self, other: TokenizerFingerprint) -> list[str]:
        """'field: ours vs theirs' for every field but `path` that differs."""
        names = [f.name for f in fields(self) if f.name != "path"]
        return [
            f"{n}: {getattr(self, n)} vs {getattr(other, n)}" for n in names if getattr(self, n) != getattr(other, n)
        ]


def tokenizer_fingerprint(directory: str | os.PathLike) -> TokenizerFingerprint:
    """Fingerprint of a SemHiTok checkpoint folder (config.json + model.safetensors), without building the model."""
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"missing {name} in {directory}: not a SemHiTok checkpoint folder")
    config = SemHiTokConfig.from_dict(json.loads((directory / TOKENIZER_FILES[0]).read_text()))
    config_hash = hashlib.sha256(json.dumps(config.fingerprint_dict(), sort_keys=True).encode()).hexdigest()
    g = config.grid
    return TokenizerFingerprint(str(directory.resolve()), config_hash, _file_sha256(directory / TOKENIZER_FILES[1]),
                                config.K, config.m, g, g, config.image_size)  # fmt: skip


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- image lists


def normalize_key(key: str) -> str:
    """An image key as the cache stores it: posix, normalised ("./a//b.png" -> "a/b.png")."""
    return posixpath.normpath(key.replace(os.sep, "/"))


def list_images(source: str | os.PathLike, image_key: str = "image") -> tuple[Path, list[str]]:
    """(root, sorted unique image keys) of a folder (every image file below it, recursively), a JSON list of records
    (LLaVA .json) or JSON lines (LLaVA .jsonl, COCO annotations.jsonl, synthetic scenes.jsonl). Records without an
    `image_key` (text-only samples) are left out; relative keys resolve against `root` = the file's folder."""
    source = Path(source)
    if source.is_dir():
        files = (Path(d, f) for d, _, names in os.walk(source, followlinks=True) for f in names)
        keys = [p.relative_to(source).as_posix() for p in files if p.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not keys:
            raise CodeCacheError(f"{source}: no image could be encoded: the folder holds no image files "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip
        return source, sorted(set(keys))
    if not source.is_file():
        raise FileNotFoundError(f"image source {source} is neither a folder nor a file")
    records = [r for _, r in read_jsonl(source)] if source.suffix == ".jsonl" else read_json(source)
    if not isinstance(records, list):
        raise CodeCacheError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    keys = {normalize_key(r[image_key]) for r in records if isinstance(r, dict) and isinstance(r.get(image_key), str)}
    if not keys:
        raise CodeCacheError(f"{source}: no record has an {image_key!r} path")
    return source.parent, sorted(keys)


class _KeyedImages(torch.utils.data.Dataset):
    """Items {"image": (3, S, S) float32 in [-1, 1], "key": str}, or a BadItem for a file that fails to load."""

    def __init__(self, root: Path, keys: Sequence[str], size: int):
        self.root, self.keys, self.size = root, keys, size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any] | BadItem:
        try:
            return {"image": to_tensor(load_image(self.root / self.keys[index], self.size)), "key": self.keys[index]}
        except ImageLoadError as e:
            return BadItem(index, self.keys[index], e.reason)


# ---------------------------------------------------------------------------------------------------- writing


def extract_codes(
    tokenizer_dir: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    image_key: str = "image",
    size: int | None = None,
    batch_size: int = 32,
    shard_size: int = 4096,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    log: Callable[[str], None] = logger.info,
) -> Path:
    """Encode every image of `images` (see `list_images`) into the cache folder `out`; resumes a killed run.
    `image_root` overrides the folder relative keys resolve against; `size`, if given, must be the tokenizer's input
    size (images are resized + centre-cropped to it). Returns `out`. CodeCacheError when no image could be encoded
    (the cache is then left incomplete)."""
    out, fp = Path(out), tokenizer_fingerprint(tokenizer_dir)
    if size is not None and size != fp.image_size:
        raise CodeCacheError(f"--size {size} but the tokenizer {tokenizer_dir} takes {fp.image_size} px images")
    root, keys = list_images(images, image_key)
    plan = {"format": FORMAT, "tokenizer": asdict(fp), "source": str(Path(images).resolve()),
            "image_root": str(Path(image_root or root).resolve()), "num_images": len(keys),
            "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "shard_size": shard_size}  # fmt: skip
    index = _resume_index(out, plan)
    tok = SemHiTok.from_pretrained(tokenizer_dir).to(device)
    num_shards = -(-len(keys) // shard_size)
    for s in range(num_shards):
        if str(s) in index["shards"]:
            continue
        shard_keys = keys[s * shard_size : (s + 1) * shard_size]
        loader = torch.utils.data.DataLoader(_KeyedImages(Path(plan["image_root"]), shard_keys, fp.image_size),
                                             batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate_skip_bad)  # fmt: skip
        index["shards"][str(s)] = _write_shard(out / SHARD_NAME.format(s), tok, loader, device)
        _write_json(out / INDEX_NAME, index)
        info = index["shards"][str(s)]
        log(f"shard {s + 1}/{num_shards}: {info['num_encoded']} encoded, {len(info['skipped'])} skipped")
    index = _finish(out, index)
    if index["num_encoded"] == 0:
        raise CodeCacheError(f"{images}: no image could be encoded; {_skip_summary(index['skipped'])}")
    _write_json(out / INDEX_NAME, index)
    return out


def _skip_summary(skipped: dict[str, str]) -> str:
    """'skipped N of N items (...): key (reason); ...' for the first few skipped images."""
    return SkipCounter(num_skipped=len(skipped), reasons=skipped).summary(max_files=3)


def _resume_index(out: Path, plan: dict) -> dict:
    """The index to continue: an existing one made with the same plan (its listed shards verified), else a fresh one.
    A cache made with another tokenizer or image list is an error (never mixed)."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp*"):  # leftovers of a killed run
        tmp.unlink()
    path = out / INDEX_NAME
    if not path.is_file():
        return {**plan, "shards": {}, "complete": False}
    index = json.loads(path.read_text())
    changed = [k for k in plan if k != "tokenizer" and index.get(k) != plan[k]]
    fp = TokenizerFingerprint(**index["tokenizer"]).differences(TokenizerFingerprint(**plan["tokenizer"]))
    if changed or fp:
        raise CodeCacheError(f"{out} holds codes of another run (differs in {changed + fp}); use a new --out folder")
    index["shards"] = {
        s: info for s, info in index["shards"].items() if _shard_ok(out / SHARD_NAME.format(int(s)), info)
    }
    index["complete"] = False
    return index


def _shard_ok(path: Path, info: dict) -> bool:
    ok = path.is_file() and _file_sha256(path) == info["sha256"]
    if not ok:
        logger.warning("shard %s is missing or corrupt; it will be computed again", path.name)
    return ok


def _write_shard(path: Path, tok: SemHiTok, loader, device: str) -> dict:
    """Encode one shard's images and write them atomically. Returns its index entry."""
    semantic, texture, keys, skipped = [], [], [], {}
    for batch in loader:
        skipped.update({b.path: b.reason for b in batch["skipped"]})
        if batch["batch_size"]:
            grid = tok.encode(batch["image"].to(device))
            semantic.append(grid.semantic.cpu())
            texture.append(grid.texture.cpu())
            keys += batch["key"]
    c = tok.config
    tensors = {name: (torch.cat(parts) if parts else torch.zeros(0, c.grid, c.grid)).to(_index_dtype(n)).contiguous()
               for name, parts, n in (("semantic", semantic, c.K), ("texture", texture, c.m))}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys)})
    os.replace(tmp, path)
    return {"file": path.name, "sha256": _file_sha256(path), "num_encoded": len(keys), "skipped": skipped}


def _index_dtype(n: int) -> torch.dtype:
    """Storage dtype of indices in [0, n): int16 when they fit (K = 16384 and 24576 do), else int32."""
    return torch.int16 if n - 1 <= torch.iinfo(torch.int16).max else torch.int32


def _finish(out: Path, index: dict) -> dict:
    """The complete index: + the per-image map key -> [shard, row] (from the shards' own key lists) and the counts."""
    shards = sorted((int(s), info) for s, info in index["shards"].items())
    images = {k: [s, row] for s, info in shards for row, k in enumerate(_shard_keys(out / info["file"]))}
    skipped = {k: r for _, info in shards for k, r in info["skipped"].items()}
    return {**index, "complete": True, "num_encoded": len(images), "num_skipped": len(skipped),
            "images": images, "skipped": skipped}  # fmt: skip


def _shard_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["keys"])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- reading


class CodeCache:
    """Read-only view of a complete cache: `grid(key)` -> TokenGrid (1, h, w) int64, `key in cache`, `len(cache)`.

    `tokenizer`: the SemHiTok checkpoint folder of the model that will use the codes; the cache must have been made
    with an identical one (K, m, h, w, config and weights hashes), else CodeCacheError says what differs.
    Shards are opened lazily and memory-mapped (shared page cache across DataLoader workers; handles are not pickled).
    """

    def __init__(self, directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
        self.directory = Path(directory)
        path = self.directory / INDEX_NAME
        if not path.is_file():
            raise CodeCacheError(
                f"{self.directory} is not a code cache (no {INDEX_NAME}); run scripts/extract_codes.py"
            )
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise CodeCacheError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
        if not index["complete"]:
            done, total = len(index["shards"]), -(-index["num_images"] // index["shard_size"])
            raise CodeCacheError(f"{self.directory}: extraction incomplete ({done}/{total} shards); re-run the same "
                                 "scripts/extract_codes.py command to finish it")  # fmt: skip
        self.fingerprint = TokenizerFingerprint(**index["tokenizer"])
        self.images: dict[str, list[int]] = index["images"]
        self.skipped: dict[str, str] = index["skipped"]  # key -> why the image could not be encoded
        self._files = {int(s): info["file"] for s, info in index["shards"].items()}
        self._handles: dict[int, Any] = {}
        if tokenizer is not None:
            self.check(tokenizer)

    @property
    def K(self) -> int:  # noqa: N802 (glossary name)
        return self.fingerprint.K

    @property
    def m(self) -> int:
        return self.fingerprint.m

    def check(self, tokenizer: str | os.PathLike) -> None:
        """Raise CodeCacheError unless the SemHiTok folder `tokenizer` has this cache's fingerprint."""
        diff = self.fingerprint.differences(tokenizer_fingerprint(tokenizer))
        if diff:
            raise CodeCacheError(
                f"the code cache {self.directory} was made with the tokenizer {self.fingerprint.path}, which differs "
                f"from {tokenizer} (cache vs model: {'; '.join(diff)}); {REEXTRACT_HINT}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, key: str) -> bool:
        return normalize_key(key) in self.images

    def grid(self, key: str) -> TokenGrid:
        """Codes of one image: TokenGrid (1, h, w) int64. KeyError names a skipped or unknown image."""
        where = self.images.get(normalize_key(key))
        if where is None:
            reason = self.skipped.get(normalize_key(key), "not in the image list it was extracted from")
            raise KeyError(f"image {key!r} has no codes in {self.directory}: {reason}")
        shard, row = where
        f = self._open(shard)
        semantic, texture = (f.get_slice(name)[row : row + 1].long() for name in ("semantic", "texture"))
        return TokenGrid(semantic, texture)

    def _open(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / self._files[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}
