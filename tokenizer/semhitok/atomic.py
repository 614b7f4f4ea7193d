"""Atomic folder writes: build into a hidden sibling, then swap it into place.

A process killed at any moment leaves either the old complete folder or the new complete one at `path`
(plus, at worst, a hidden `.name-*` leftover that readers never look at), never a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.with_name(f".{path.name}-old-{os.getpid()}")
        if path.exists():
            path.replace(old)
        tmp.replace(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush file contents to disk before the rename makes them visible."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
