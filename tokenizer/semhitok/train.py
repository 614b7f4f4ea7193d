"""Tokenizer training: run config, data, one stage per run, resumable checkpoints, export (DESIGN §3).

Stage "1" trains the semantic branch (teacher distillation + EMA VQ); "2" freezes it and trains the pixel branch
with L1 + perceptual + VQ terms + PatchGAN (adaptive weight, off before `loss.disc_start`); "2b" swaps in the
enhance decoder and trains only that. Stages 2 / 2b start from the previous stage's export (`train.init_from`).

A run lives in `out_dir`: `config.yaml` (the resolved run config), `log.jsonl`, `samples/step-XXXXXX.png`
(originals over reconstructions; stage 1 has no meaningful pixel decoder, so it logs the holdout cosine to the
teacher instead), `checkpoints/step-XXXXXX/` and, at the end, `model/` (`SemHiTok.save_pretrained`, EMA weights
when `train.ema_decay > 0`). Starting a run whose `out_dir` holds a complete checkpoint resumes it exactly
(model, EMA, optimizers, discriminator, step, RNG, data order) from the newest intact one; a resume with a different
config is refused. One run at a time owns `out_dir` (`semhitok.runtime.runlock`); a second one is refused with one line.
Under `torchrun` (RANK / WORLD_SIZE set) the run is data-parallel (gloo on CPU, nccl on CUDA); rank 0 logs and saves.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from semhitok.config import PRESETS, PixelConfig, SemanticConfig, SemHiTokConfig
from semhitok.losses import (
    adaptive_weight,
    build_discriminator,
    build_perceptual_loss,
    d_loss,
    g_loss,
    gan_active,
    pixel_losses,
    semantic_loss,
    vq_loss,
)
from semhitok.metrics import psnr
from semhitok.model import STAGES, SemHiTok, StageForward
from semhitok.runtime.checkpoint import (
    CheckpointError,
    flatten_state,
    load_resume_point,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from semhitok.runtime.configio import (
    ConfigError,
    apply_overrides,
    check_lr,
    config_diff,
    from_dict,
    merge_dicts,
    read_yaml,
    save_config,
    to_dict,
)
from semhitok.runtime.data import BadItem, ImageFolderDataset, SkipCounter, collate_skip_bad, to_pil
from semhitok.runtime.distributed import DistInfo, init_distributed, resolve_device
from semhitok.runtime.loop import MAX_EMPTY_BATCHES, EmptyBatches, append_jsonl, console, skipped_line, truncate_log
from semhitok.runtime.precision import Precision, resolve_precision
from semhitok.runtime.runlock import hold_run_folder
from semhitok.teachers import Teacher, build_teacher
from semhitok.types import QuantizerOutput

NUM_SAMPLES = 8  # holdout images in every sample grid / holdout evaluation
# Keys a resumed run may change: they steer the loop's cadence, not what it computes.
RESUMABLE_CHANGES = ("out_dir", "train.precision", "train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "train.keep_last", "train.data.num_workers")
# Model-config keys a stage takes from its own run config although its weights come from `init_from`.
FRESH_FROM_RUN = MappingProxyType({
    "2": ("pixel", "quantizer", "loss", "teacher.path", "semantic.init_from_teacher"),  # copies the semantic branch
    "2b": ("pixel.use_enhance_decoder", "pixel.enhance_ch", "pixel.enhance_num_res_blocks", "loss", "teacher.path",
           "semantic.init_from_teacher"),  # copies everything but the (new) enhance decoder
})


# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class DataConfig:
    """Training images: folders (recursive; flat = unlabelled), a stable hashed holdout split, loader settings.
    Images are loaded at `model.image_size` (resize short side + centre crop)."""

    train: tuple[str, ...] = ()  # image folders, relative to the working directory (the repo root)
    holdout_fraction: float = 0.01  # by hashed relative path: the same files are held out on every run
    split_seed: int = 0
    batch_size: int = 8  # per process
    num_workers: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW for the stage's parameters (linear warm-up, then constant) and for the discriminator."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    disc_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_lr("train.optim.lr", self.lr)
        check_lr("train.optim.disc_lr", self.disc_lr)


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Frequencies are in optimizer steps; 0 turns sampling off and checkpoints to end only."""

    stage: str | int = "1"  # "1" | "2" | "2b" (a bare 2 from YAML or the command line is accepted)
    init_from: str = ""  # stage 2: stage 1's exported model folder; 2b: stage 2's
    steps: int = 1000
    ema_decay: float = 0.999  # EMA of the trainable weights, exported; 0 = off
    teacher_cache: bool = False  # stage 1: memoise teacher features per image (training uses fixed crops)
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 1000
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"  # auto | bf16 | fp32 (semhitok.runtime.precision: auto = bf16 where native)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", str(self.stage))  # normalise 2 -> "2"
        if self.stage not in STAGES:
            raise ValueError(f"train.stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps} (a run without steps exports an untrained "
                             "model)")
        if self.log_every < 1 or min(self.ckpt_every, self.sample_every, self.keep_last) < 0:
            raise ValueError("train.log_every must be >= 1; ckpt_every, sample_every, keep_last >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class TokenizerRunConfig:
    """Everything a tokenizer training run needs; saved as `out_dir/config.yaml`."""

    model: SemHiTokConfig = field(default_factory=SemHiTokConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = ""

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir must be set")
        if self.model.pixel.use_enhance_decoder:
            raise ValueError("model.pixel.use_enhance_decoder is set by stage 2b itself; leave it false")


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TokenizerRunConfig:
    """YAML run config + `a.b=value` overrides. An optional top-level `preset:` (a name in PRESETS) is the base of
    `model:`, which then lists only the differences. Unknown keys / bad values raise ConfigError."""
    data = read_yaml(Path(path))
    preset = data.pop("preset", None)
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ConfigError(f"{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = {"model": to_dict(PRESETS[preset] if preset else SemHiTokConfig()), "train": to_dict(TrainConfig())}
    return from_dict(TokenizerRunConfig, apply_overrides(merge_dicts(base, data), overrides))


# ------------------------------------------------------------------------------------------------ distributed


def _wrap_ddp(module: nn.Module, device: torch.device, sync_buffers: bool = True) -> nn.Module:
    """DDP in a process group (else the module itself); `sync_buffers=False`: no buffer broadcast per forward."""
    if not dist.is_initialized():
        return module
    # torch >= 2.13 renames broadcast_buffers (buffers are still synced once at construction either way)
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": sync_buffers}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, **sync)


def _all_reduce(value: int, device: torch.device, op: str = "sum") -> int:
    """An int reduced over all ranks ("sum" | "min"); the value itself in a single process."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return int(t.item())


# ------------------------------------------------------------------------------------------------------- data


def in_holdout(relpath: str, fraction: float, seed: int) -> bool:
    """Stable split: a file is held out iff the hash of (seed, path relative to its folder) falls below `fraction`."""
    digest = hashlib.blake2b(f"{seed}:{relpath}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def build_datasets(data: DataConfig, image_size: int) -> tuple[Dataset, Dataset]:
    """(train, holdout) over every folder of `data.train`; clear ConfigError for a missing or empty folder."""
    if not data.train:
        raise ConfigError("train.data.train is empty: list at least one image folder")
    train, held = [], []
    for i, root in enumerate(data.train):
        try:
            ds = ImageFolderDataset(root, image_size)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"train.data.train[{i}]: {err}") from None
        mask = [in_holdout(p.relative_to(root).as_posix(), data.holdout_fraction, data.split_seed) for p in ds.paths]
        train.append(Subset(ds, [j for j, h in enumerate(mask) if not h]))
        held.append(Subset(ds, [j for j, h in enumerate(mask) if h]))
    return ConcatDataset(train), ConcatDataset(held)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, this rank's share) that starts `skip` samples into the epoch."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int):
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def first_images(dataset: Dataset, n: int) -> Tensor | None:
    """The first (up to) n loadable images of `dataset`, (n, 3, H, W); None if there are none."""
    good = (item["image"] for item in map(dataset.__getitem__, range(len(dataset))) if not isinstance(item, BadItem))
    images = list(itertools.islice(good, n))
    return torch.stack(images) if images else None


# ---------------------------------------------------------------------------------------------------- helpers


class CachedTeacher(Teacher):
    """Memoises a teacher's `features` per image, keyed by a hash of the image's pixels (valid for fixed crops).
    Features are kept on the CPU in float32; a batch only runs the teacher on the images not seen before."""

    def __init__(self, teacher: Teacher):
        super().__init__(teacher.cfg, teacher.grid)
        self.inner = teacher
        self._cache: dict[str, Tensor] = {}

    @property
    def dim(self) -> int:
        return self.inner.dim

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, L, D_teacher)."""
        keys = [hashlib.blake2b(x.detach().float().cpu().numpy().tobytes(), digest_size=16).hexdigest() for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, f in zip(missing, self.inner.features(images[missing]).float().cpu(), strict=True):
                self._cache[keys[i]] = f.clone()
        return torch.stack([self._cache[k] for k in keys]).to(images.device)

    def student_init_state(self) -> dict[str, Tensor]:
        return self.inner.student_init_state()


class WeightEMA:
    """EMA of a model's trainable parameters, decay warmed up as min(decay, (1 + step) / (10 + step))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self.params.values()], 1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise CheckpointError("checkpoint EMA does not match the model's trainable parameters")
        for n, t in self.shadow.items():
            t.copy_(state[n])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its live weights again after it."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
            try:
                yield
            finally:
                for n, p in self.params.items():
                    p.copy_(live[n])


def image_grid(rows: Sequence[Tensor]) -> Image.Image:
    """Rows of images (n, 3, H, W) in [-1, 1] -> one PIL image, each row's images side by side."""
    return to_pil(torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1))


# ------------------------------------------------------------------------------------------------------ model


def stage1_objective(out: dict[str, Any], s: SemanticConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(1 - cos) + l1_weight * L1 to the teacher + commit_weight * commitment -> (loss, metrics)."""
    q: QuantizerOutput = out["quantizer"]
    terms = semantic_loss(out["semantic_recon"], out["semantic_target"])
    loss = terms["cosine"] + s.l1_weight * terms["l1"] + s.commit_weight * q.losses["commit"]
    return loss, {"loss": loss, **{f"semantic/{k}": v for k, v in {**terms, **q.losses, **q.stats}.items()}}


def vq_objective(q: QuantizerOutput, p: PixelConfig) -> Tensor:
    """Weighted stage-2 codebook + commitment terms; `losses.vq_loss` owns which weight each term name takes."""
    return vq_loss(q.losses, p)


def _codebook_names(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hierarchical terms are already 'semantic/...' and 'texture/...'; a baseline's single codebook: 'codebook/...'."""
    return {k if "/" in k else f"codebook/{k}": v for k, v in terms.items()}


def load_init(model: SemHiTok, path: str, stage: str) -> None:
    """Copy what stage `stage` inherits from `init_from`: the semantic branch (2) or the whole model (2b)."""
    if not path:
        raise ConfigError(f"stage {stage} needs train.init_from: the exported model folder of the previous stage")
    try:
        src = SemHiTok.from_pretrained(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    diff = config_diff(src.config.to_dict(), model.config.to_dict(), FRESH_FROM_RUN[stage])
    if diff:
        raise ConfigError(f"train.init_from {path} has a different architecture (init_from vs this run): "
                          + "; ".join(diff))
    if stage == "2b" and src.config.pixel.use_enhance_decoder:
        raise ConfigError(f"train.init_from {path} already has an enhance decoder; "
                          "stage 2b starts from a stage-2 export")
    pairs = zip(model.semantic_modules(), src.semantic_modules(), strict=True) if stage == "2" else [(model, src)]
    for dst, s in pairs:
        dst.load_state_dict(s.state_dict())


def prepare_stage(model: SemHiTok, stage: str) -> list[nn.Parameter]:
    """Freeze / swap parts for the stage; every parameter outside the stage gets requires_grad=False (so DDP sees
    no unused parameters). Returns the trainable parameters."""
    if stage != "1":
        model.freeze_semantic()
    if stage == "2b":
        model.use_enhance_decoder()
    trainable = {id(p) for p in model.stage_parameters(stage)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return [p for p in model.parameters() if p.requires_grad]


def build_model(run: TokenizerRunConfig, resuming: bool) -> SemHiTok:
    """The stage's model: fresh (stage 1, optionally with a cached teacher) or from `init_from` (2 / 2b); on resume
    the checkpoint supplies the weights, so `init_from` is not read."""
    cfg, t = run.model, run.train
    teacher = None
    if t.stage == "1":
        if t.init_from:
            raise ConfigError("train.init_from is for stages 2 and 2b; stage 1 starts from the teacher")
        try:
            teacher = build_teacher(cfg.teacher, cfg.grid)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model.teacher: {err}") from None
        teacher = CachedTeacher(teacher) if t.teacher_cache else teacher
    model = SemHiTok(cfg, teacher=teacher, init_from_teacher=t.stage == "1")
    if t.stage != "1" and not resuming:
        load_init(model, t.init_from, t.stage)
    return model


# ---------------------------------------------------------------------------------------------------- trainer


class TokenizerTrainer:
    """One stage of tokenizer training in `run.out_dir`, resumed from its newest complete checkpoint if any."""

    def __init__(self, run: TokenizerRunConfig, info: DistInfo | None = None, device: torch.device | None = None):
        self.run, self.info, self.cfg, self.t = run, info or DistInfo(), run.model, run.train
        self.device = device or resolve_device(run.train.device)
        self.out = Path(run.out_dir)
        self.stage = self.t.stage
        self.precision = resolve_precision(self.t.precision, self.device)
        self.step = self.batches_seen = self.saved_step = 0
        self.skips = SkipCounter()
        self._seed(self.t.seed)
        train_set, holdout = build_datasets(self.t.data, self.cfg.image_size)
        self._build_loader(train_set)
        found = load_resume_point(self.out, owner=self.info.is_main)
        self.raw = build_model(run, resuming=found is not None).to(self.device).train()
        self.params = prepare_stage(self.raw, self.stage)
        self._build_optimizers()
        if found is not None:
            self._resume(*found)
        stage_forward = StageForward(self.raw, self.stage)  # DDP syncs gradients only through a module's forward
        self.model = _wrap_ddp(stage_forward, self.device, sync_buffers=False)  # quantizers sync their own statistics
        self.disc = _wrap_ddp(self.raw_disc, self.device) if self.raw_disc is not None else None
        self.samples = first_images(holdout if len(holdout) else train_set, NUM_SAMPLES) if self.info.is_main else None
        if self.info.is_main:
            self._start_files(len(train_set), len(holdout), found[0] if found else None)

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _build_loader(self, train_set: Dataset) -> None:
        d, world = self.t.data, self.info.world_size
        if len(train_set) < d.batch_size * world:
            raise ConfigError(f"only {len(train_set)} training images for batch_size {d.batch_size} "
                              f"x {world} processes")
        self.sampler = ResumableSampler(train_set, self.info, self.t.seed)
        self.per_epoch = self.sampler.num_samples // d.batch_size
        self.loader = DataLoader(
            train_set, batch_size=d.batch_size, sampler=self.sampler, num_workers=d.num_workers,
            collate_fn=collate_skip_bad, drop_last=True, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.t.seed),  # never draws from the global RNG
        )

    def _build_optimizers(self) -> None:
        """AdamW for the stage, the weight EMA; stages 2 / 2b: discriminator + its AdamW, perceptual network."""
        o = self.t.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ema = WeightEMA(self.raw, self.t.ema_decay) if self.t.ema_decay > 0 else None
        self.raw_disc, self.opt_d, self.perceptual = None, None, None
        if self.stage != "1":
            self.raw_disc = build_discriminator(self.cfg.loss).to(self.device)
            self.opt_d = torch.optim.AdamW(self.raw_disc.parameters(), lr=o.disc_lr, betas=o.betas,
                                           weight_decay=o.weight_decay)
            perceptual = build_perceptual_loss(self.cfg.loss)
            self.perceptual = perceptual.to(self.device) if perceptual is not None else None

    def _state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        groups = {"model": self.raw.state_dict(), "optimizer": flatten_state(self.opt.state_dict())}
        if self.ema is not None:
            groups["ema"] = self.ema.state_dict()
        if self.raw_disc is not None:
            groups["disc"] = self.raw_disc.state_dict()
            groups["disc_optimizer"] = flatten_state(self.opt_d.state_dict())
        meta = {"batches_seen": self.batches_seen, "num_ok": self.skips.num_ok,
                "num_skipped": self.skips.num_skipped, "config": to_dict(self.run)}
        return groups, meta

    def _resume(self, path: Path, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        diff = config_diff(meta["config"], to_dict(self.run), RESUMABLE_CHANGES)
        if diff:
            raise ConfigError(f"{self.out} holds a run with a different config (checkpoint vs now): {'; '.join(diff)}. "
                              "Use a new out_dir, or delete the old one to start over")
        self.raw.load_state_dict(groups["model"])
        restore_optimizer(self.opt, groups["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(groups["ema"])
        if self.raw_disc is not None:
            self.raw_disc.load_state_dict(groups["disc"])
            restore_optimizer(self.opt_d, groups["disc_optimizer"])
        self.step = self.saved_step = meta["step"]
        self.batches_seen = meta["batches_seen"]
        self.skips.num_ok, self.skips.num_skipped = meta["num_ok"], meta["num_skipped"]
        restore_rng(groups["rng"])

    def _start_files(self, n_train: int, n_holdout: int, ckpt: Path | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.run, self.out / "config.yaml")
        truncate_log(self.out / "log.jsonl", self.step)
        n_params = sum(p.numel() for p in self.params)
        start = f"resuming {ckpt}" if ckpt else "starting"
        print(f"stage {self.stage}: {start}; {n_train} train / {n_holdout} holdout images, {n_params / 1e6:.2f}M "
              f"trainable params, {self.info.world_size} x {self.device}, {self.precision.describe()}", flush=True)

    # ---------------------------------------------------------------- loop

    def fit(self) -> None:
        """Train until `train.steps`, logging, sampling and checkpointing on the way, then a final checkpoint."""
        bar = tqdm(total=self.t.steps, initial=self.step, disable=not (self.info.is_main and sys.stderr.isatty()))
        sums: dict[str, tuple[Tensor, int]] = {}  # metric -> (sum, steps that reported it) since the last log
        count, skipped, tick = 0, 0, time.perf_counter()
        batches, empty = self._batches(), EmptyBatches(min(self.per_epoch, MAX_EMPTY_BATCHES))
        while self.step < self.t.steps:
            batch = next(batches)
            self.batches_seen += 1
            self.skips.update(batch)
            skipped += batch["num_skipped"]
            usable = _all_reduce(batch["batch_size"], self.device, "min") > 0
            empty.update(usable, self.skips)
            if not usable:
                continue  # every item of some rank's batch failed to load: all ranks skip it together
            for k, v in self.train_step(batch["image"].to(self.device, non_blocking=True)).items():
                total, n = sums.get(k, (0.0, 0))
                sums[k] = (total + v.detach().float(), n + 1)
            count, self.step = count + 1, self.step + 1
            bar.update(1)
            if self.step % self.t.log_every == 0:
                self._log(sums, count, skipped, time.perf_counter() - tick, bar)
                sums, count, skipped, tick = {}, 0, 0, time.perf_counter()
            if self.t.sample_every and self.step % self.t.sample_every == 0 and self.samples is not None:
                self.evaluate()
            if self.t.ckpt_every and self.step % self.t.ckpt_every == 0:
                self.save()
        bar.close()
        if self.info.is_main and self.skips.num_skipped:
            print(f"stage {self.stage} done: {self.skips.summary()}", flush=True)
        if self.saved_step != self.step:
            self.save()

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches in a fixed order given (seed, epoch); continues from `batches_seen` (exact resume)."""
        while True:
            epoch, done = divmod(self.batches_seen, self.per_epoch)
            self.sampler.set_epoch(epoch)
            self.sampler.skip = done * self.t.data.batch_size
            yield from self.loader

    def _lr(self) -> float:
        o = self.t.optim
        return o.lr * min(1.0, (self.step + 1) / o.warmup_steps) if o.warmup_steps else o.lr

    def _autocast(self) -> Any:
        return self.precision.autocast(self.device)

    def train_step(self, images: Tensor) -> dict[str, Tensor]:
        """One optimizer step of the stage (+ one discriminator step once the GAN is on) -> metrics."""
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        with self._autocast():
            out = self.model(images)
            loss, metrics = self._objective(out, images)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = self._clip(self.params)
        self.opt.step()
        if self.stage != "1" and gan_active(self.step, self.cfg.loss):
            metrics.update(self._disc_step(images, out["recon"].detach()))
        if self.ema is not None:
            self.ema.update(self.step)
        return metrics

    def _objective(self, out: dict[str, Any], images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.stage == "1":
            return stage1_objective(out, self.cfg.semantic)
        lc, recon, q = self.cfg.loss, out["recon"], out["quantizer"]
        terms = pixel_losses(recon, images, self.perceptual)
        rec = lc.l1_weight * terms["l1"] + lc.perceptual_weight * terms["perceptual"]
        loss = rec + vq_objective(q, self.cfg.pixel)
        metrics = {**terms, **_codebook_names(q.losses), **_codebook_names(q.stats)}
        if gan_active(self.step, lc):
            self.raw_disc.requires_grad_(False)  # generator step: gradients reach the image only
            g = g_loss(self.raw_disc(recon))["g_loss"]
            w = adaptive_weight(rec, g, self.raw.last_decoder_layer, lc.adaptive_weight_max)
            loss = loss + lc.gan_weight * w * g
            metrics.update(g_loss=g, adaptive_weight=w)
        return loss, {"loss": loss, **metrics}

    def _disc_step(self, images: Tensor, fake: Tensor) -> dict[str, Tensor]:
        self.raw_disc.requires_grad_(True)
        with self._autocast():
            terms = d_loss(self.disc(images), self.disc(fake))
        self.opt_d.zero_grad(set_to_none=True)
        terms["d_loss"].backward()
        terms["disc_grad_norm"] = self._clip(list(self.raw_disc.parameters()))
        self.opt_d.step()
        return terms

    def _clip(self, params: list[nn.Parameter]) -> Tensor:
        clip = self.t.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)

    # ---------------------------------------------------------------- outputs

    def _log(self, sums: dict[str, tuple[Tensor, int]], count: int, skipped: int, seconds: float, bar: tqdm) -> None:
        skipped = _all_reduce(skipped, self.device)  # every rank reaches this step
        if not self.info.is_main or count == 0:
            return
        record = {"step": self.step, "stage": self.stage, "epoch": self.batches_seen // self.per_epoch,
                  **{k: (total / n).item() for k, (total, n) in sums.items()},
                  "lr": self.opt.param_groups[0]["lr"], "num_skipped": skipped,
                  "num_skipped_total": self.skips.num_skipped, "sec_per_step": seconds / count}
        append_jsonl(self.out / "log.jsonl", record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if bar.disable:
            print(f"step {self.step}/{self.t.steps} loss {record['loss']:.4f} {record['sec_per_step']:.3f} s/step",
                  flush=True)
        if skipped:
            console(skipped_line(self.step, skipped, self.skips), bar)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Holdout images through the (EMA) model: stage 1 logs the cosine to the teacher; stages 2 / 2b log L1 and
        PSNR of encode -> decode and write `samples/step-XXXXXX.png` (originals over reconstructions)."""
        x = self.samples.to(self.device)
        with self.ema.applied() if self.ema is not None else nullcontext():
            if self.stage == "1":
                self.raw.eval()
                out = self.raw.semantic_forward(x)
                self.raw.train()
                record = {"holdout/semantic_cosine": F.cosine_similarity(
                    out["semantic_recon"].float(), out["semantic_target"].float(), dim=-1).mean().item()}
            else:
                recon = self.raw.decode(self.raw.encode(x))
                record = {"holdout/l1": F.l1_loss(recon, x).item(), "holdout/psnr": psnr(recon, x, max_db=100.0).mean().item()}
                (self.out / "samples").mkdir(exist_ok=True)
                image_grid([x, recon]).save(self.out / "samples" / f"step-{self.step:06d}.png")
        append_jsonl(self.out / "log.jsonl", {"step": self.step, **record})
        return record

    def save(self) -> None:
        if self.info.is_main:
            groups, meta = self._state()
            save_checkpoint(self.out, self.step, groups, meta, keep_last=self.t.keep_last)
        self.saved_step = self.step

    def export(self) -> Path:
        """`out_dir/model` = the trained tokenizer (EMA weights if enabled), written by rank 0."""
        path = self.out / "model"
        if self.info.is_main:
            with self.ema.applied() if self.ema is not None else nullcontext():
                self.raw.save_pretrained(path)
        return path


def train(run: TokenizerRunConfig) -> Path:
    """Run (or resume) one stage of `run`; returns the exported model folder. Joins `torchrun`'s process group."""
    joined = not dist.is_initialized()
    info, device = init_distributed(run.train.device)
    try:
        with hold_run_folder(run.out_dir, info.is_main, device):  # one run per out_dir
            trainer = TokenizerTrainer(run, info, device)
            trainer.fit()
            model_dir = trainer.export()
            if dist.is_initialized():
                dist.barrier()  # no rank tears the group down while another still has collectives in flight
        return model_dir
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
