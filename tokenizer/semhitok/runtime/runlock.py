"""Exclusive ownership of a run folder, so that two runs never write into one `out_dir`.

`RunLock(folder)` holds an exclusive `fcntl.flock` on `folder/.lock`, a file that names its owner ("pid 123 on
host"). The kernel drops the lock when its owner dies, however it dies (SIGKILL included), so a lock file that is
free but still names an owner was left by a dead run: it is taken over, with a line saying so. A second live run is
refused with RunLockError naming the folder and the owner. A clean exit removes the file.

`hold_run_folder` is what both trainers use: rank 0 takes the lock and, as the owner, deletes what killed runs left
behind (`checkpoint.clean_leftovers`); every rank then learns whether it may go on.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from semhitok.runtime.checkpoint import CheckpointError, clean_leftovers

LOCK_NAME = ".lock"


class RunLockError(CheckpointError):
    """The run folder is in use by another live run (or cannot be locked)."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder (created if missing); `with RunLock(folder):` or acquire /
    release. The lock file is checked after locking: a releasing owner unlinks it, a later one recreates it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self, log: Callable[[str], None] = print) -> None:
        """Take the lock (RunLockError if a live run holds it); a stale owner's name is logged as taken over."""
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = self._locked_fd()
        stale = _owner(fd)
        if stale:
            log(f"{self.folder}: taking over the lock of {stale}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock (no-op if not held); the folder too if `acquire` made it and it is empty."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._made_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # not empty: the run wrote into it

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _locked_fd(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                owner = _owner(fd)
                os.close(fd)
                raise self._refusal(err, owner) from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # the owner released (unlinked) it between our open and our lock: try the new file

    def _refusal(self, err: OSError, owner: str) -> RunLockError:
        if isinstance(err, BlockingIOError):
            return RunLockError(f"{self.folder} is in use by another run ({owner or 'owner starting up'}): wait for "
                                "it to end, or use another out_dir")  # fmt: skip
        return RunLockError(f"cannot lock the run folder {self.folder} ({err.strerror or err})")


def _owner(fd: int) -> str:
    """The owner the lock file names ("pid 123 on host"), or "" for an empty file."""
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextmanager
def hold_run_folder(folder: str | os.PathLike, is_main: bool, device: torch.device,
                    log: Callable[[str], None] = print) -> Iterator[None]:  # fmt: skip
    """Run the block with rank 0 holding `folder`'s RunLock and the leftovers of killed runs deleted. Collective in
    a process group: every rank raises RunLockError when rank 0 is refused (rank 0's error names the owner)."""
    lock, error = RunLock(folder), None
    try:
        if is_main:
            try:
                lock.acquire(log)
                _report_leftovers(clean_leftovers(folder), log)
            except RunLockError as err:
                error = err
        if not _everyone_ok(error is None, device):
            raise error or RunLockError(f"{folder} is in use by another run (rank 0 could not lock it)")
        yield
    finally:
        lock.release()


def _report_leftovers(removed: list[Path], log: Callable[[str], None]) -> None:
    if removed:
        log(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(str(p) for p in removed)}")


def _everyone_ok(ok: bool, device: torch.device) -> bool:
    """True iff `ok` on every rank (`ok` itself outside a process group)."""
    if not dist.is_initialized():
        return ok
    t = torch.tensor([int(ok)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
