"""The training skeleton both trainers run (DESIGN §2): the batch stream (resumable sampler, exact resume by batches
seen, all ranks skip an empty batch together, stop after too many), the torch runner (autocast, gradient
accumulation, clipping, optimizer step), the rank-0 logger (log.jsonl, and TensorBoard when asked), and `Trainer`:
the run loop with logging, periodic evaluation and checkpoints (save with retention + integrity, resume with
config-diff refusal), and `run_training`: process group + run-folder lock around build -> fit -> export.

A trainer supplies what differs: its model and objective (`run_step`), its log record, its checkpoint groups, its
evaluation and its export.
"""

from __future__ import annotations

import faulthandler
import itertools
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from semhitok.runtime.checkpoint import load_resume_point, restore_rng, save_checkpoint
from semhitok.runtime.configio import ConfigError, config_diff, from_dict, save_config, to_dict
from semhitok.runtime.data import SkipCounter
from semhitok.runtime.launch import Launch, barrier, join_process_group, reduce_int
from semhitok.runtime.loop import MAX_EMPTY_BATCHES, EmptyBatches, append_jsonl, console, skipped_line, truncate_log
from semhitok.runtime.precision import ResolvedPrecision
from semhitok.runtime.runlock import hold_run_folder
from semhitok.runtime.tensorboard import TENSORBOARD_DIR, TensorBoardLog, tensorboardx

LOG_NAME = "log.jsonl"


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, this rank's share) that starts `skip` samples into the epoch.
    With `group_by_length` G > 0 (and a dataset with `length_hint(index, epoch)`), this order is then cut into windows
    of G batches; within a window the samples are sorted by length into batches and the batches shuffled
    (`group_by_length`): less padding, the same samples per epoch, still a fixed function of (seed, epoch)."""

    def __init__(self, dataset: Dataset, launch: Launch, seed: int, batch_size: int = 1, group_by_length: int = 0):
        super().__init__(dataset, num_replicas=launch.world_size, rank=launch.rank, shuffle=True, seed=seed)
        if group_by_length and not hasattr(dataset, "length_hint"):
            raise ConfigError(f"group_by_length needs a dataset with length_hint(index, epoch); {type(dataset).__name__} "
                              "has none")  # fmt: skip
        self.skip, self.batch_size, self.group = 0, batch_size, group_by_length

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()
        if self.group:
            hint = self.dataset.length_hint  # type: ignore[attr-defined]
            order = iter(group_by_length(list(order), lambda i: hint(i, self.epoch), self.batch_size, self.group,
                                         torch.Generator().manual_seed(self.seed + self.epoch)))  # fmt: skip
        return itertools.islice(order, self.skip, None)


def group_by_length(order: list[int], length: Callable[[int], int], batch_size: int, group: int,
                    generator: torch.Generator) -> list[int]:  # fmt: skip
    """`order` cut into windows of `group` batches; in each window the samples sorted by `length` (longest first) and
    cut into batches, whose order is then shuffled. A final partial batch stays last, so every batch before it is
    whole (the loader's drop_last drops only it)."""
    out, window = [], batch_size * group
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=length, reverse=True)
        batches = [ranked[k : k + batch_size] for k in range(0, len(ranked), batch_size)]
        tail = [batches.pop()] if len(batches[-1]) < batch_size else []
        out += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
        out += [i for b in tail for i in b]
    return out

    def __len__(self) -> int:
        return self.num_samples - self.skip


class BatchStream:
    """This rank's batches in a fixed order given (seed, epoch), continuing from `seen` (exact resume). Batches the
    collator emptied on any rank are skipped by all ranks together (`EmptyBatches` stops a run that only has those)."""

    def __init__(self, dataset: Dataset, launch: Launch, *, seed: int, batch_size: int, num_workers: int,
                 collate_fn: Callable, noun: str = "samples", group_by_length: int = 0):  # fmt: skip
        if len(dataset) < batch_size * launch.world_size:
            raise ConfigError(f"only {len(dataset)} training {noun} for batch_size {batch_size} "
                              f"x {launch.world_size} processes")  # fmt: skip
        self.dataset, self.device, self.batch_size = dataset, launch.device, batch_size
        self.sampler = ResumableSampler(dataset, launch, seed, batch_size, group_by_length)
        self.per_epoch = self.sampler.num_samples // batch_size  # batches per epoch and rank
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers, drop_last=True,
            collate_fn=collate_fn, pin_memory=launch.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG
        )  # fmt: skip
        self.seen = self.interval_skipped = 0  # batches taken (per rank); samples skipped since the last log
        self.skips = SkipCounter()
        self.empty = EmptyBatches(min(self.per_epoch, MAX_EMPTY_BATCHES))
        self._batches: Iterator[dict[str, Any]] | None = None

    def batches(self) -> Iterator[dict[str, Any]]:
        """Every batch from `seen` on, usable or not."""
        while True:
            epoch, done = divmod(self.seen, self.per_epoch)
            self.sampler.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self.sampler.skip = done * self.batch_size
            yield from self.loader

    def next_usable(self) -> dict[str, Any]:
        """The next batch every rank has samples for; ConfigError after too many empty ones in a row."""
        self._batches = self._batches or self.batches()
        while True:
            batch = next(self._batches)
            self.seen += 1
            self.skips.update(batch)
            self.interval_skipped += batch["num_skipped"]
            usable = reduce_int(batch["batch_size"], self.device, "min") > 0
            self.empty.update(usable, self.skips)
            if usable:
                return batch

    def take_skipped(self) -> int:
        """Samples skipped since the last call."""
        skipped, self.interval_skipped = self.interval_skipped, 0
        return skipped


def scheduled_lr(step: int, total: int, lr: float, warmup: int, schedule: str = "constant",
                 min_lr_ratio: float = 0.0) -> float:  # fmt: skip
    """LR of optimizer step `step` (0-based) of `total`: linear warm-up over `warmup` steps to `lr`, then "constant"
    or "cosine" down to min_lr_ratio * lr at `total` (both trainers' schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"schedule must be constant or cosine, got {schedule!r}")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = lr x its "lr_scale" (1 where a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class TorchRunner:
    """Single process or DDP: autocast, our own gradient accumulation (DDP syncs only on the last micro-batch),
    clipping and the optimizer step. `model` is what the forward runs through (maybe DDP-wrapped)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 precision: ResolvedPrecision, device: torch.device, grad_clip: float):  # fmt: skip
        self.model, self.optimizer, self.params, self.clip = model, optimizer, params, grad_clip
        self.precision, self.device = precision, device

    def micro_step(self, compute: Callable[[nn.Module], dict[str, Tensor]], micro: int, accum: int) -> dict[str, Tensor]:
        """`compute(model)` (-> dict with "loss") under autocast, then backward of loss / accum."""
        if micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        last = micro == accum - 1
        sync = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with self.precision.autocast(self.device):
                out = compute(self.model)
            (out["loss"] / accum).backward()
        return out

    def optimizer_step(self, lr: float) -> Tensor:
        """Clip, step; returns the gradient norm before clipping (a tensor, not synchronised here)."""
        set_lr(self.optimizer, lr)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else math.inf)
        self.optimizer.step()
        return norm.detach()


class RankZeroLog:
    """The one logger: rank 0 appends records to `log.jsonl` (and, given a `board` folder, to TensorBoard) and shows
    them on the progress bar (or prints a line when stderr is not a terminal); other ranks stay silent."""

    def __init__(self, path: Path, launch: Launch, total: int, start: int, board: Path | None = None):
        self.path, self.main = path, launch.is_main
        self.bar = tqdm(total=total, initial=start, disable=not (self.main and sys.stderr.isatty()), unit="step")
        self.board = TensorBoardLog(board, start) if board is not None and self.main else None

    def info(self, text: str) -> None:
        if self.main:
            console(text, self.bar)

    def record(self, record: dict[str, Any], line: str, postfix: dict[str, str]) -> None:
        """`record` into log.jsonl; `postfix` on the bar, or `line` printed when there is no bar."""
        if not self.main:
            return
        self._append(record)
        self.bar.set_postfix(**postfix)
        if self.bar.disable:
            print(line, flush=True)

    def write(self, record: dict[str, Any]) -> None:
        """A record without a console line (evaluation results)."""
        if self.main:
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        if self.board is not None:
            self.board.write(record)

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()


@dataclass(frozen=True)
class Cadence:
    """In optimizer steps: log, checkpoint (0 = at the end only) and evaluate (0 = never); checkpoints kept."""

    log_every: int
    ckpt_every: int
    keep_last: int
    eval_every: int = 0
    log_at_end: bool = False  # also log the last step when it is not a multiple of log_every


class Trainer:
    """The run loop and checkpoint manager. A subclass builds, in its `__init__` (after `super().__init__`):
    `self.stream` (a BatchStream), `self.total` (steps), the model, then calls `self.resume(*found)` if
    `self.find_resume_point()` found one, and `self.start(line)`. It supplies the hooks below. `tensorboard`: the log
    also goes to `out/tensorboard/` (`semhitok.runtime.tensorboard`; the package is checked here, on every rank)."""

    RESUMABLE_CHANGES: tuple[str, ...] = ()  # config keys a resumed run may change (cadence, not what is computed)
    OUT_KEY = "out_dir"  # the config key of the run folder, for messages
    POSITION_KEY = "batches_seen"  # meta key of the data position

    stream: BatchStream
    total: int
    log: RankZeroLog

    def __init__(self, run: Any, launch: Launch, out: Path, stage: str, cadence: Cadence, tensorboard: bool = False):
        self.run, self.launch, self.out, self.stage, self.cadence = run, launch, Path(out), stage, cadence
        self.step = self.saved_step = 0
        self.board = self.out / TENSORBOARD_DIR if tensorboard else None
        if tensorboard:
            tensorboardx()  # a missing package fails before anything is built

    # ---------------------------------------------------------------- hooks

    def run_step(self) -> None:
        """One optimizer step (batches from `self.stream`); accumulates what `log_record` reports."""
        raise NotImplementedError

    def log_record(self, seconds: float, skipped: int) -> tuple[dict[str, Any], str, dict[str, str]] | None:
        """Collective. (record, console line, bar postfix) for the steps since the last log; resets the sums."""
        raise NotImplementedError

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Collective. (tensor groups, meta) of this trainer; the skeleton adds position, skips and config."""
        raise NotImplementedError

    def load_state(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def resume_diff(self, meta: dict[str, Any]) -> list[str]:
        """Differences beyond the config that forbid a resume ("key: old vs new")."""
        return []

    def after_save(self) -> None:
        """Rank 0, after a checkpoint is complete."""

    def periodic_eval(self) -> None:
        """Every `cadence.eval_every` steps."""

    def export(self) -> Path:
        raise NotImplementedError

    # ---------------------------------------------------------------- set-up

    def find_resume_point(self) -> tuple[Path, dict[str, dict[str, Tensor]], dict[str, Any]] | None:
        return load_resume_point(self.out, owner=self.launch.is_main)

    def start(self, line: str) -> None:
        """The logger; rank 0 writes config.yaml, cuts log.jsonl (and the TensorBoard events) back to the resumed step
        and prints `line`."""
        self.log = RankZeroLog(self.out / LOG_NAME, self.launch, self.total, self.step, self.board)
        if self.launch.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.run, self.out / "config.yaml")
            truncate_log(self.out / LOG_NAME, self.step)
            self.log.info(line)

    # ---------------------------------------------------------------- loop

    def fit(self) -> None:
        """Train to `total` steps, logging, evaluating and checkpointing on the way; a final checkpoint at the end."""
        c, tick = self.cadence, time.perf_counter()
        while self.step < self.total:
            self.run_step()
            self.step += 1
            self.log.bar.update(1)
            if self.step % c.log_every == 0 or (c.log_at_end and self.step == self.total):
                self._log(time.perf_counter() - tick)
                tick = time.perf_counter()
            if c.eval_every and self.step % c.eval_every == 0:
                self.periodic_eval()
            if c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < self.total:
                self.save()
        self.log.close()
        if self.stream.skips.num_skipped:
            self.log.info(f"stage {self.stage} done: {self.stream.skips.summary()}")
        if self.saved_step != self.step:
            self.save()

    def _log(self, seconds: float) -> None:
        skipped = reduce_int(self.stream.take_skipped(), self.launch.device)  # collective: every rank gets here
        entry = self.log_record(seconds, skipped)
        if entry is not None:
            self.log.record(*entry)
        if skipped:
            self.log.info(skipped_line(self.step, skipped, self.stream.skips))

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Collective: an atomic checkpoint of step `self.step`, written by rank 0 (keeps `cadence.keep_last`)."""
        groups, meta = self.checkpoint_state()
        if self.launch.is_main:
            s = self.stream
            meta = {**meta, self.POSITION_KEY: s.seen, "num_ok": s.skips.num_ok, "num_skipped": s.skips.num_skipped,
                    "config": to_dict(self.run)}  # fmt: skip
            save_checkpoint(self.out, self.step, groups, meta, keep_last=self.cadence.keep_last)
            self.after_save()
        self.saved_step = self.step
        barrier()

    def saved_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's config with the keys the schema gained since it was written at their defaults (a new
        option's default computes what the old code did), so a run resumes across such an upgrade; as saved when it
        no longer parses (then every difference is named)."""
        try:
            return to_dict(from_dict(type(self.run), saved))
        except (ConfigError, TypeError, ValueError):
            return saved

    def resume(self, path: Path, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        """Continue from a checkpoint, refused when the config differs beyond RESUMABLE_CHANGES."""
        diff = config_diff(self.saved_config(meta["config"]), to_dict(self.run), self.RESUMABLE_CHANGES)
        diff += self.resume_diff(meta)
        if diff:
            raise ConfigError(f"{self.out} holds a run with a different config (checkpoint vs now): {'; '.join(diff)}. "
                              f"Use a new {self.OUT_KEY}, or delete the old one to start over")  # fmt: skip
        self.load_state(groups, meta)
        self.step = self.saved_step = meta["step"]
        self.stream.seen = meta[self.POSITION_KEY]
        self.stream.skips.num_ok, self.stream.skips.num_skipped = meta["num_ok"], meta["num_skipped"]
        restore_rng(groups["rng"])


def write_curves(out: Path) -> None:
    """out/log.jsonl -> out/curves.png (learning curves, silently); a run that logged nothing gets a line instead."""
    from semhitok.runtime.plots import plot_curves

    try:
        plot_curves(out / LOG_NAME, out / "curves.png", out.name)
    except (OSError, ValueError) as err:
        print(f"learning curves not drawn: {err}", flush=True)


def run_training(launch: Launch, out_dir: str, build: Callable[[], Trainer]) -> Path:
    """Join the launcher's process group, hold the run folder (one run per out_dir), build -> fit -> export.
    Returns the exported folder. `kill -USR1 <pid>` makes a running (or hung) rank print every thread's stack."""
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (captured, in-process)
            pass
    created = join_process_group(launch)
    try:
        with hold_run_folder(out_dir, launch.is_main, launch.device):
            trainer = build()
            trainer.fit()
            path = trainer.export()
            if launch.is_main:
                write_curves(Path(out_dir))
            barrier()  # no rank tears the group down while another still has collectives in flight
        return path
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
