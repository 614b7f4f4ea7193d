"""Run safety of both trainers (issue #11): data without a usable sample stops with one line, one run per out_dir
(lock), nothing fetched from the network, crash-safe pruning and start-up clean-up, checksummed checkpoints with
fallback, one-line errors for bad learning rates / steps / a full disk, skipped samples on the console, and normal
permissions on exported folders."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_mllm_train import TINY_YAML as MLLM_YAML
from test_mllm_train import random_tokens, tiny_run, world  # noqa: F401 (world: the tiny MLLM fixture)
from test_tokenizer_train import ENV, FAST, SCRIPT, TINY_YAML, script_args

import semhitok.runtime.atomic as atomic
import semhitok.runtime.checkpoint as checkpoint
from mllm.train import load_run_config as load_mllm_config
from mllm.train import train as train_mllm
from semhitok.runtime import BadItem, CheckpointError, ConfigError, RunLock, RunLockError, hold_run_folder
from semhitok.runtime.atomic import atomic_folder
from semhitok.runtime.checkpoint import (
    COMPLETE,
    clean_leftovers,
    complete_checkpoints,
    load_checkpoint,
    load_resume_point,
)
from semhitok.train import load_run_config, train

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
HOLDER = """import sys, time
from semhitok.runtime import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)"""  # another run holding a folder, until killed


def write_images(root: Path, good: int, bad: int) -> Path:
    """`good` smooth 40x40 PNGs and `bad` files that are not images, in a flat folder."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((40, 40)).save(root / f"img{i:02d}.png")
    for i in range(bad):
        (root / f"bad{i:02d}.png").write_bytes(b"not a png")
    return root


def tok_run(images: Path, out: Path, *overrides: str):
    return load_run_config(TINY_YAML, [f"train.data.train=[{images}]", f"out_dir={out}", *FAST, *overrides])


def tiny_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(64, 64).state_dict()}


# ---------------------------------------------------------------------------------- 1. every batch empty


def test_tokenizer_all_bad_images_stop_with_one_line(tmp_path):
    images = write_images(tmp_path / "images", good=0, bad=12)
    with pytest.raises(ConfigError) as err:
        train(tok_run(images, tmp_path / "out", "train.data.holdout_fraction=0"))
    message = str(err.value)
    print(message)
    assert "\n" not in message and message.startswith("no usable training sample in 3 consecutive batches: ")
    assert (
        "skipped 12 of 12 items (12 distinct files): " in message
        and "(UnidentifiedImageError: cannot identify" in message
    )


def test_mllm_every_sample_too_long_stops_with_one_line(world, tmp_path):  # noqa: F811
    """data.max_length=5 cuts every sample's image: the run stops after one epoch of empty batches (4 of 4)."""
    with pytest.raises(ConfigError) as err:
        train_mllm(tiny_run(world, tmp_path, "data.max_length=5"))
    message = str(err.value)
    print(message)
    assert "\n" not in message and message.startswith("no usable training sample in 4 consecutive batches: ")
    assert "skipped 16 of 16 items" in message and "(max_length would cut an image)" in message


# -------------------------------------------------------------------------------------------- 2. run lock


def start_holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s run lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_one_out_dir_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    out, images = tmp_path / "out", write_images(tmp_path / "images", good=8, bad=0)
    holder = start_holder(out)
    try:
        busy = rf"^{out} is in use by another run \(pid {holder.pid} on {HOST}\): wait for it to end, or use another "
        busy += "out_dir$"
        with pytest.raises(RunLockError, match=busy):
            RunLock(out).acquire()
        result = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY_YAML), *script_args(images, out)],
                                cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
        print(result.stderr)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"train_tokenizer.py: error: {out} is in use by another run (pid {holder.pid}")
        assert not (out / "log.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lines: list[str] = []
    lock = RunLock(out)
    lock.acquire(log=lines.append)  # the holder died without releasing: its lock is stale
    print(lines)
    assert lines == [f"{out}: taking over the lock of pid {holder.pid} on {HOST}, which is no longer running"]
    lock.release()


def test_one_lock_per_folder_released_cleanly(tmp_path):
    (tmp_path / ".lock").write_text(f"pid 999999999 on {HOST}\n")  # what a killed run leaves: a file, no flock
    lines: list[str] = []
    lock = RunLock(tmp_path)
    lock.acquire(log=lines.append)
    assert lines == [f"{tmp_path}: taking over the lock of pid 999999999 on {HOST}, which is no longer running"]
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {HOST}\n"
    with pytest.raises(RunLockError, match=f"in use by another run \\(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()  # a second lock object, even in the same process
    lock.release()
    assert not (tmp_path / ".lock").exists()
    RunLock(tmp_path).acquire(log=lines.append)  # released cleanly: no takeover line
    assert len(lines) == 1


def test_the_lock_is_released_on_errors_and_leftovers_cleaned_only_when_held(tmp_path):
    leftover = tmp_path / "checkpoints" / ".step-000004-tmp-ab12cd34"
    leftover.mkdir(parents=True)
    other = RunLock(tmp_path)
    other.acquire()
    with pytest.raises(RunLockError, match="in use by another run"):
        with hold_run_folder(tmp_path, is_main=True, device=torch.device("cpu")):
            pass
    assert leftover.exists()  # not ours to clean while another run holds the folder
    other.release()
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="the run failed"):
        with hold_run_folder(tmp_path, is_main=True, device=torch.device("cpu"), log=lines.append):
            assert not leftover.exists() and (tmp_path / ".lock").exists()
            raise RuntimeError("the run failed")
    assert not (tmp_path / ".lock").exists()  # released on the exception
    assert lines == [f"removed 1 leftover(s) of an interrupted run: {leftover}"]


# ------------------------------------------------------------------------------------------- 3. no network


def test_nothing_is_fetched_at_run_time(world, tmp_path, monkeypatch):  # noqa: F811
    """A mistyped two-part relative path (`model.llm=world/llm`) used to be taken for a hub name and downloaded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ConfigError) as err:
        train_mllm(tiny_run(world, tmp_path / "out", "model.llm=world/llm"))
    print(err.value)
    assert str(err.value) == "not found: model.llm: world/llm (nothing is downloaded at run time: pass a local folder)"
    assert attempts == [] and not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- 4. pruning and leftovers


def test_pruning_renames_before_deleting_and_the_owner_cleans_leftovers(tmp_path, monkeypatch):
    """A kill in the middle of deleting an old checkpoint leaves a hidden folder, never a marker-less step-N."""
    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process "dies"
        if ".step-" in Path(path).name and "-deleting-" in Path(path).name:
            next(Path(path).glob("*.safetensors")).unlink()
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, tiny_state(step), {}, keep_last=0)
    monkeypatch.setattr(atomic.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 3, tiny_state(3), {}, keep_last=1)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    print(names)
    assert names[0].startswith(".step-000001-deleting-") and names[1:] == ["step-000002", "step-000003"]
    legacy = tmp_path / "checkpoints" / "step-000007"  # what in-place deletion used to leave: no COMPLETE marker
    shutil.copytree(tmp_path / "checkpoints" / "step-000003", legacy)
    (legacy / COMPLETE).unlink()
    export_tmp = tmp_path / ".model-tmp-0badc0de"  # a killed export
    export_tmp.mkdir()
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted([export_tmp.name, names[0], "step-000007"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


# -------------------------------------------------------------------------------------- 5. checksums


def corrupt_same_size(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # tensor bytes, not the header: loads silently without checksums
    file.write_bytes(bytes(data))


def test_checksums_catch_same_size_damage_and_resume_falls_back(tmp_path):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, tiny_state(step), {"note": step})
    newest = tmp_path / "checkpoints" / "step-000002"
    assert json.loads((newest / COMPLETE).read_text())["files"]["model.safetensors"]["sha256"]
    corrupt_same_size(newest / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"^checkpoint .*step-000002 is damaged: model.safetensors \(checksum mismatch\)$"
    ):
        load_checkpoint(newest)
    lines: list[str] = []
    path, groups, meta = load_resume_point(tmp_path, log=lines.append)
    print(lines)
    assert path.name == "step-000001" and meta["note"] == 1
    assert torch.equal(groups["model"]["weight"], tiny_state(1)["model"]["weight"])
    aside = tmp_path / "checkpoints" / "damaged-step-000002"
    assert lines == [f"warning: checkpoint {newest} is damaged: model.safetensors (checksum mismatch); resuming from "
                     f"{path} instead (the damaged one is moved to {aside})"]  # fmt: skip
    assert aside.is_dir() and complete_checkpoints(tmp_path) == [path]


def test_old_markers_without_checksums_still_load_and_all_damaged_is_one_line(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, 1, tiny_state(), {})
    marker = json.loads((path / COMPLETE).read_text())
    marker["files"] = {name: entry["bytes"] for name, entry in marker["files"].items()}  # the format before checksums
    (path / COMPLETE).write_text(json.dumps(marker))
    assert torch.equal(load_checkpoint(path)[0]["model"]["bias"], tiny_state()["model"]["bias"])
    (path / "model.safetensors").write_bytes(b"\xff" * (path / "model.safetensors").stat().st_size)
    with pytest.raises(CheckpointError) as err:
        load_resume_point(tmp_path)
    print(err.value)
    assert str(err.value).startswith(f"every checkpoint of {tmp_path} is damaged (checkpoint {path} is damaged: ")
    assert "\n" not in str(err.value) and str(err.value).endswith("move them away to start over")


def test_tokenizer_resume_falls_back_from_a_damaged_checkpoint(tmp_path, capsys):
    images, out = write_images(tmp_path / "images", good=12, bad=0), tmp_path / "out"
    train(tok_run(images, out, "train.keep_last=0", "train.sample_every=0"))
    corrupt_same_size(out / "checkpoints" / "step-000004" / "model.safetensors")
    capsys.readouterr()
    train(tok_run(images, out, "train.keep_last=0", "train.sample_every=0", "train.steps=6"))
    stdout = capsys.readouterr().out
    print(stdout)
    assert (
        f"warning: checkpoint {out / 'checkpoints' / 'step-000004'} is damaged: model.safetensors (checksum "
        f"mismatch); resuming from {out / 'checkpoints' / 'step-000002'} instead" in stdout
    )
    assert f"resuming {out / 'checkpoints' / 'step-000002'}" in stdout
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]


# ------------------------------------------------------------------------------ 6. one-line config / disk errors


@pytest.mark.parametrize("value", ["0", "-1e-4", "nan", ".nan", ".inf"])
def test_learning_rates_must_be_finite_and_positive(value, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.optim: train.optim.lr must be a finite number > 0, got"):
        tok_run(tmp_path, tmp_path / "out", f"train.optim.lr={value}")
    with pytest.raises(ConfigError, match=r"^train.optim: train.optim.disc_lr must be a finite number > 0, got"):
        tok_run(tmp_path, tmp_path / "out", f"train.optim.disc_lr={value}")
    with pytest.raises(ConfigError, match=r"^train: train.lr must be a finite number > 0, got") as err:
        load_mllm_config(MLLM_YAML, [f"train.lr={value}"])
    print(err.value)


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    previous = checkpoint.save_checkpoint(tmp_path, 1, tiny_state(1), {})
    save_file = checkpoint.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    target = tmp_path / "checkpoints" / "step-000002"
    with pytest.raises(CheckpointError) as err:
        checkpoint.save_checkpoint(tmp_path, 2, tiny_state(2), {}, keep_last=1)
    print(err.value)
    assert str(err.value) == (f"could not write checkpoint {target}: no space left on device (the half-written copy "
                              f"is removed; the previous checkpoint {previous} is intact)")  # fmt: skip
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no hidden half-written folder
    assert torch.equal(load_checkpoint(previous)[0]["model"]["weight"], tiny_state(1)["model"]["weight"])


# ------------------------------------------------------------------ 7. steps, skipped samples, permissions


def test_tokenizer_steps_must_be_at_least_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^train: train.steps must be >= 1, got 0 \(a run without steps exports"):
        tok_run(tmp_path, tmp_path / "out", "train.steps=0")


def test_skipped_samples_are_on_the_console(tmp_path, capsys):
    images, out = write_images(tmp_path / "images", good=10, bad=2), tmp_path / "out"
    train(tok_run(images, out, "train.data.holdout_fraction=0", "train.sample_every=0"))
    stdout = capsys.readouterr().out
    print(stdout)
    lines = [line for line in stdout.splitlines() if "skipped" in line]
    assert re.match(r"step \d+: \d+ sample\(s\) skipped since the last log; skipped \d+ of \d+ items", lines[0])
    assert "(UnidentifiedImageError: cannot identify image file" in lines[0]
    assert lines[-1].startswith("stage 1 done: skipped ") and "bad0" in lines[-1]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((out / "model").stat().st_mode) == 0o777 & ~umask  # the export: not mkdtemp's 0700


class WithBadItems(torch.utils.data.Dataset):
    """Every third item of `inner` is a BadItem (as a sample whose image would be cut)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return BadItem(i, f"sample{i}", "max_length would cut an image") if i % 3 == 0 else self.inner[i]


def test_mllm_skipped_samples_are_on_the_console(world, tmp_path, capsys):  # noqa: F811
    run = tiny_run(world, tmp_path, "train.steps=2", "train.ckpt_every=0", "train.export_merged=false")
    train_mllm(run, dataset=WithBadItems(random_tokens(world, 12)))
    stdout = capsys.readouterr().out
    print(stdout)
    lines = [line for line in stdout.splitlines() if "skipped" in line]
    assert re.match(r"step \d+: \d+ sample\(s\) skipped since the last log; skipped \d+ of \d+ items", lines[0])
    assert "(max_length would cut an image)" in lines[0] and lines[-1].startswith("stage joint done: skipped ")


def test_exported_folders_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "x.json").write_text("{}")
        os.umask(0o027)
        with atomic_folder(tmp_path / "other") as tmp:
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o750  # the umask decides, as with mkdir
