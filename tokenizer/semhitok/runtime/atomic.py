"""Atomic folder writes and removals: build into a hidden sibling, then swap it into place; delete by renaming to a
hidden sibling first.

A process killed at any moment leaves either the old complete folder or the new complete one at `path` (plus, at
worst, a hidden leftover `.name-tmp-*`, `.name-old-*` or `.name-deleting-*` that readers never look at and
`remove_leftovers` deletes), never a half-written or half-deleted folder. Folders get the permissions `mkdir` gives
(0777 minus the umask, e.g. 0755), not the 0700 of `tempfile.mkdtemp`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEFTOVER = re.compile(r"\..+-(tmp|old|deleting)-[0-9a-f]+")  # hidden siblings made by `_new_hidden`


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_hidden(path, "tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _new_hidden(path, "old") if path.exists() else None
        if old is not None:
            path.replace(old)  # onto the empty placeholder folder
        tmp.replace(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_folder(path: str | os.PathLike) -> None:
    """Delete the folder `path`: renamed to a hidden sibling first (atomic); a kill midway leaves no partial `path`."""
    path = Path(path)
    trash = _new_hidden(path, "deleting")
    path.replace(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(parent: str | os.PathLike) -> list[Path]:
    """Delete the hidden leftovers of killed atomic writes / removals directly in `parent`; returns them. Only for a
    folder this process owns: a live writer's temporary folder looks the same."""
    parent = Path(parent)
    found = [p for p in parent.iterdir() if LEFTOVER.fullmatch(p.name) and p.is_dir()] if parent.is_dir() else []
    for leftover in found:
        shutil.rmtree(leftover, ignore_errors=True)
    return found


def _new_hidden(path: Path, kind: str) -> Path:
    """A new empty folder `.<name>-<kind>-<random hex>` beside `path`, made by mkdir (so the umask applies)."""
    while True:
        candidate = path.with_name(f".{path.name}-{kind}-{secrets.token_hex(4)}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _fsync_tree(folder: Path) -> None:
    """Flush file contents to disk before the rename makes them visible."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
