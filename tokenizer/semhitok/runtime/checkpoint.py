"""Resumable training checkpoints, model-agnostic (the tokenizer and the MLLM trainers both use them). No pickle.

Layout: `run_dir/checkpoints/step-000123/` holds one `<group>.safetensors` per tensor group (model, EMA,
optimizer, discriminator, ..., and `rng`), `meta.json`, and a `COMPLETE` marker written last with the size and
SHA-256 of every file. The folder is built in a hidden sibling and renamed into place (`atomic_folder`), and old
ones are renamed to a hidden name before they are deleted (`remove_folder`), so readers only ever see complete
checkpoints; `latest_checkpoint` still requires the marker and ignores hidden leftovers of killed writers, which the
run lock's holder deletes (`clean_leftovers`). `load_checkpoint` verifies the checksums; `load_resume_point` falls
back from a damaged newest checkpoint to the newest intact one.

Nested non-tensor state (a torch optimizer's `state_dict()`, RNG states) is flattened by `flatten_state` into
`{key: Tensor}` plus a JSON skeleton of the structure, itself stored as a uint8 tensor, so every group is a plain
safetensors file and `unflatten_state` rebuilds the object exactly (int dict keys and tuples included).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from semhitok.runtime.atomic import atomic_folder, remove_folder, remove_leftovers

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
RNG_GROUP = "rng"
STRUCTURE_KEY = "__structure__"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint found on resume is moved to `damaged-step-XXXXXX`
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt or does not fit the object it is loaded into."""


# ------------------------------------------------------------------------------------- nested state <-> tensors


def flatten_state(obj: Any) -> dict[str, Tensor]:
    """Nested dicts / lists / tuples of Tensors, numpy arrays and JSON scalars -> {path: Tensor} + skeleton.

    Dict keys may be str or int (torch optimizer state is keyed by int). The skeleton sits under STRUCTURE_KEY."""
    tensors: dict[str, Tensor] = {}

    def encode(x: Any, key: str) -> Any:
        if isinstance(x, Tensor):
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": key, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, dict):
            if not all(isinstance(k, (str, int)) for k in x):
                raise TypeError(f"flatten_state: dict keys must be str or int at {key or 'top level'}")
            return {"__dict__": [[k, encode(v, f"{key}.{k}" if key else str(k))] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            items = [encode(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(x)]
            return {"__tuple__": items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"flatten_state: cannot store {type(x).__name__} at {key or 'top level'}")

    skeleton = json.dumps(encode(obj, ""))
    return {**tensors, STRUCTURE_KEY: torch.frombuffer(bytearray(skeleton.encode()), dtype=torch.uint8)}


def unflatten_state(flat: dict[str, Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if STRUCTURE_KEY not in flat:
        raise CheckpointError(f"not a flattened state: no {STRUCTURE_KEY!r} entry")

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return flat[x["__tensor__"]]
        if "__ndarray__" in x:
            raw = flat[x["__ndarray__"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
        if "__tuple__" in x:
            return tuple(decode(v) for v in x["__tuple__"])
        return {k: decode(v) for k, v in x["__dict__"]}

    return decode(json.loads(bytes(flat[STRUCTURE_KEY].tolist()).decode()))


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Load a `flatten_state(optimizer.state_dict())` group into `optimizer` (tensors move to its params' devices)."""
    try:
        optimizer.load_state_dict(unflatten_state(flat))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state does not fit this optimizer: {err}") from None


# ------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """torch CPU (+ every CUDA device once CUDA is initialised), numpy and python `random` generator states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(flat: dict[str, Tensor]) -> None:
    """Restore the generators saved by `save_checkpoint` (its `rng` group); CUDA only if the device count fits."""
    state = unflatten_state(flat)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ------------------------------------------------------------------------------------------------ save / load


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, dict[str, Tensor]],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXX/` atomically: one safetensors file per group of `tensors`, the
    calling process's RNG states (group `rng`), `meta.json` (JSON-able `meta` + step), then `COMPLETE` (the size and
    SHA-256 of every file). Keeps the newest `keep_last` complete checkpoints (0 = all). Returns the folder.
    A failed write (disk full, ...) raises CheckpointError; the half-written copy is removed, older ones stay."""
    if RNG_GROUP in tensors:
        raise ValueError(f"tensor group name {RNG_GROUP!r} is reserved for the RNG states")
    groups = {**tensors, RNG_GROUP: flatten_state(rng_state())}
    path = checkpoint_dir(run_dir, step)
    try:
        with atomic_folder(path) as tmp:
            _write_groups(tmp, groups)
            (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}))  # last: marks it complete
    except (OSError, SafetensorError) as err:
        kept = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {kept} is intact" if kept else "there is no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {path}: {_reason(err)} (the half-written copy is "
                              f"removed; {kept})") from None  # fmt: skip
    if keep_last > 0:
        prune_checkpoints(run_dir, keep_last)
    return path


def _write_groups(folder: Path, groups: dict[str, dict[str, Tensor]]) -> None:
    for name, group in groups.items():
        save_file(_detached_unshared(group), str(folder / f"{name}.safetensors"))


def _reason(err: Exception) -> str:
    """'no space left on device' (ENOSPC, also when safetensors reports it), else the OS's words or the message."""
    text = getattr(err, "strerror", None) or str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "StorageFull" in text or "No space left" in text:
        return "no space left on device"
    return text


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _detached_unshared(group: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in group.items():
        t = value.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (hidden temp folders and marker-less ones ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of `run_dir`, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """-> (tensor groups on CPU incl. `rng`, meta). Checks every file against the COMPLETE marker (size and SHA-256;
    markers written before checksums: size only); CheckpointError names what is wrong."""
    path = Path(path)
    files = _marked_files(path)
    problems = {name: _file_problem(path / name, expected) for name, expected in files.items()}
    wrong = [f"{name} ({problem})" for name, problem in problems.items() if problem]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is damaged: {', '.join(wrong)}")
    try:
        groups = {Path(name).stem: load_file(str(path / name)) for name in files if name.endswith(".safetensors")}
        return groups, json.loads((path / META).read_text())
    except (OSError, SafetensorError, ValueError) as err:  # only for old markers without checksums
        raise CheckpointError(f"checkpoint {path} is damaged: {err}") from None


def _marked_files(path: Path) -> dict[str, Any]:
    """The COMPLETE marker's {file name: {"bytes", "sha256"}} (or {file name: bytes} in markers before checksums)."""
    try:
        return json.loads((path / COMPLETE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged: unreadable {COMPLETE} marker ({err})") from None


def _file_problem(file: Path, expected: dict[str, Any] | int) -> str:
    """What is wrong with one file of a checkpoint ("" if nothing)."""
    size, sha = (expected, None) if isinstance(expected, int) else (expected["bytes"], expected["sha256"])
    if not file.is_file():
        return "missing"
    if file.stat().st_size != size:
        return f"{file.stat().st_size} bytes, expected {size}"
    return "checksum mismatch" if sha is not None and _sha256(file) != sha else ""


def load_resume_point(
    run_dir: str | os.PathLike, owner: bool = True, log: Callable[[str], None] = print
) -> tuple[Path, dict[str, dict[str, Tensor]], dict[str, Any]] | None:
    """The newest intact checkpoint of `run_dir`, loaded: (folder, tensor groups, meta); None if the run has none.
    A damaged newer one is skipped; the `owner` of the run folder (the run lock's holder) logs a warning line naming
    it and moves it aside to `checkpoints/damaged-step-XXXXXX`, so that pruning never keeps it in place of good ones.
    CheckpointError if every checkpoint is damaged."""
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            groups, meta = load_checkpoint(path)
        except CheckpointError as err:
            damaged.append((path, err))
            continue
        for bad, err in damaged if owner else ():
            aside = _set_aside(bad)
            log(f"warning: {err}; resuming from {path} instead (the damaged one is moved to {aside})")
        return path, groups, meta
    if damaged:
        errors = "; ".join(str(e) for _, e in damaged[:3]) + (f"; {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged ({errors}): move them away to start over")
    return None


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `damaged-step-XXXXXX` (`-2`, `-3`, ... if taken), out of every listing."""
    aside, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    path.replace(aside)
    return aside


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, each renamed to a hidden name first, so a kill
    midway leaves a hidden leftover (see `clean_leftovers`), never a partial `step-XXXXXX` folder."""
    for path in complete_checkpoints(run_dir)[:-keep_last]:
        remove_folder(path)


def clean_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed runs left in `run_dir`: hidden temp / deleting folders of atomic writes (checkpoints and
    `run_dir`'s own exports) and `step-XXXXXX` folders without a COMPLETE marker. Returns them. Only the holder of
    the run folder's lock (`semhitok.runtime.runlock`) may call this: a live writer's temp folder looks the same."""
    root = Path(run_dir) / CHECKPOINTS
    incomplete = [p for p in root.iterdir() if _unfinished(p)] if root.is_dir() else []
    for path in incomplete:
        shutil.rmtree(path, ignore_errors=True)
    return [*remove_leftovers(run_dir), *incomplete]


def _unfinished(path: Path) -> bool:
    """A hidden temp / deleting checkpoint folder, or a step folder without its COMPLETE marker."""
    hidden, step = path.name.startswith(".step-"), _STEP_DIR.fullmatch(path.name) is not None
    return path.is_dir() and (hidden or step and not (path / COMPLETE).is_file())
