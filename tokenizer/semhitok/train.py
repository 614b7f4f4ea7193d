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
The run loop, logging and checkpoints are the shared skeleton's (`semhitok.runtime.trainer`); the stages are
objectives (`semhitok.objectives`).
Under `torchrun` (RANK / WORLD_SIZE set) the run is data-parallel (gloo on CPU, nccl on CUDA); rank 0 logs and saves.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from semhitok.attribute_probe import PROBE_REPRESENTATIONS, ProbeSet
from semhitok.config import PRESETS, SemHiTokConfig
from semhitok.model import STAGES, SemHiTok, StageForward
from semhitok.objectives import build_objective
from semhitok.runtime import (
    BadItem,
    BatchStream,
    Cadence,
    CheckpointError,
    ConfigError,
    ImageFolderDataset,
    Launch,
    Precision,
    TorchRunner,
    Trainer,
    apply_overrides,
    check_lr,
    collate_skip_bad,
    config_diff,
    flatten_state,
    from_dict,
    merge_dicts,
    read_yaml,
    resolve_device,
    resolve_precision,
    restore_optimizer,
    run_training,
    scheduled_lr,
    seed_everything,
    to_dict,
    wrap_ddp,
)
from semhitok.teachers import Teacher, build_teacher

NUM_SAMPLES = 8  # holdout images in every sample grid / holdout evaluation
# Keys a resumed run may change: they steer the loop's cadence, not what it computes.
RESUMABLE_CHANGES = ("out_dir", "train.precision", "train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "train.keep_last", "train.probe", "train.data.num_workers", "train.tensorboard")
# Model-config keys a stage takes from its own run config although its weights come from `init_from`.
FRESH_FROM_RUN = MappingProxyType({
    "2": ("pixel", "quantizer", "loss", "teacher.path", "semantic.init_from_teacher"),  # copies the semantic branch
    "2b": ("pixel.use_enhance_decoder", "pixel.enhance_ch", "pixel.enhance_num_res_blocks", "pixel.enhance_ch_mult", "loss",
           "teacher.path", "semantic.init_from_teacher"),  # copies everything but the (new) enhance decoder
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
class ProbeConfig:
    """Code probes during training (DESIGN §9): at every `train.sample_every` step, on rank 0, a per-patch MLP probe
    (semhitok.attribute_probe) of each of `representations` on the first `images` rows of `data` (a probe.jsonl as
    `scripts/render_synthetic.py` writes it; "" = off) -> `probe/<representation>/<task>` in log.jsonl; the teacher's
    row once at the start of a fresh run."""

    data: str = ""
    images: int = 500
    epochs: int = 10
    representations: tuple[str, ...] = ("student", "semantic_codes", "both_codes")

    def __post_init__(self) -> None:
        allowed = [r for r in PROBE_REPRESENTATIONS if r != "teacher"]
        if not set(self.representations) <= set(allowed) or self.images < 10 or self.epochs < 1:
            raise ValueError(f"train.probe: representations from {allowed}, images >= 10, epochs >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW for the stage's parameters (linear warm-up, then constant or cosine to min_lr_ratio * lr at the last
    step) and for the discriminator."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    disc_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_lr("train.optim.lr", self.lr)
        check_lr("train.optim.disc_lr", self.disc_lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage. Frequencies are in optimizer steps; 0 turns sampling off and checkpoints to end only.
    `tensorboard: true` also writes every number of log.jsonl as a TensorBoard scalar into `out_dir/tensorboard/`
    (rank 0; needs the tensorboardX package, the `tensorboard` extra)."""

    stage: str | int = "1"  # "1" | "2" | "2b" (a bare 2 from YAML or the command line is accepted)
    init_from: str = ""  # stage 2: stage 1's exported model folder; 2b: stage 2's
    steps: int = 1000
    ema_decay: float = 0.999  # EMA of the trainable weights, exported; 0 = off
    teacher_cache: bool = False  # stage 1: memoise teacher features per image (training uses fixed crops)
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 1000
    keep_last: int = 2  # complete checkpoints kept; 0 = all
    tensorboard: bool = False  # also log to out_dir/tensorboard/ (semhitok.runtime.tensorboard)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"  # auto | bf16 | fp32 (semhitok.runtime.precision: auto = bf16 where native)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

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



# ------------------------------------------------------------------------------------------------------ model


def load_init(model: SemHiTok, path: str, stage: str) -> None:
    """Copy what stage `stage` inherits from `init_from`: the semantic branch (2) or the whole model (2b)."""
    if not path:
        raise ConfigError(f"stage {stage} needs train.init_from: the exported model folder of the previous stage")
    try:
        src = SemHiTok.from_pretrained(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if src.omitted:
        raise ConfigError(f"train.init_from {path} is an inference package without {', '.join(src.omitted)}: "
                          "start from the previous stage's training export")
    diff = config_diff(src.config.to_dict(), model.config.to_dict(), FRESH_FROM_RUN[stage])
    if diff:
        raise ConfigError(f"train.init_from {path} has a different architecture (init_from vs this run): "
                          + "; ".join(diff))
    if stage == "2b" and src.config.pixel.use_enhance_decoder:  # continue that enhance decoder (e.g. with a GAN)
        keys = [k.split(".")[1] for k in FRESH_FROM_RUN["2b"] if k.startswith("pixel.enhance_")]  # its shape
        a, b = (c.to_dict()["pixel"] for c in (src.config, model.config))
        diff = config_diff({k: a[k] for k in keys}, {k: b[k] for k in keys}, where="pixel")
        if diff:
            raise ConfigError(f"train.init_from {path} has an enhance decoder of another shape (init_from vs this "
                              "run): " + "; ".join(diff) + "; a new enhance decoder starts from a stage-2 export")
        model.use_enhance_decoder()  # same shape: stage 2b's own use_enhance_decoder() then keeps these weights
    pairs = zip(model.semantic_modules(), src.semantic_modules(), strict=True) if stage == "2" else [(model, src)]
    for dst, s in pairs:
        dst.load_state_dict(s.state_dict())


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


class TokenizerTrainer(Trainer):
    """One stage of tokenizer training in `run.out_dir`, resumed from its newest complete checkpoint if any. The stage
    is an objective (`semhitok.objectives.OBJECTIVES`); the run loop, logging and checkpoints are the skeleton's."""

    RESUMABLE_CHANGES = RESUMABLE_CHANGES
    OUT_KEY = "out_dir"
    POSITION_KEY = "batches_seen"

    def __init__(self, run: TokenizerRunConfig, launch: Launch | None = None):
        t = run.train
        launch = launch or Launch(device=resolve_device(t.device))
        cadence = Cadence(t.log_every, t.ckpt_every, t.keep_last, eval_every=t.sample_every)
        super().__init__(run, launch, Path(run.out_dir), t.stage, cadence, tensorboard=t.tensorboard)
        self.cfg, self.t, self.device, self.total = run.model, t, launch.device, t.steps
        self.precision = resolve_precision(t.precision, self.device)
        seed_everything(t.seed)
        train_set, holdout = build_datasets(t.data, self.cfg.image_size)
        self.stream = BatchStream(train_set, launch, seed=t.seed, batch_size=t.data.batch_size,
                                  num_workers=t.data.num_workers, collate_fn=collate_skip_bad, noun="images")  # fmt: skip
        self.loader = self.stream.loader
        found = self.find_resume_point()
        self.raw = build_model(run, resuming=found is not None).to(self.device).train()
        self.objective = build_objective(t.stage, self.raw, self.cfg, t.optim, self.precision, self.device)
        if found is None and self.objective.fit_images:
            fit_on = first_images(train_set, self.objective.fit_images)
            if fit_on is None:
                raise ConfigError("semantic.target whitened: no loadable training image to fit the whitener on")
            self.objective.fit_targets(fit_on)
        self.params = self.objective.params
        o = t.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.ema = WeightEMA(self.raw, t.ema_decay) if t.ema_decay > 0 else None
        if found is not None:
            self.resume(*found)
        # DDP syncs gradients only through a module's forward; quantizers sync their own statistics (no buffer sync)
        forward = wrap_ddp(StageForward(self.raw, self.stage), launch, sync_buffers=False)
        self.runner = TorchRunner(forward, self.opt, self.params, self.precision, self.device, o.grad_clip)
        self.objective.wrap(launch)
        self.samples = first_images(holdout if len(holdout) else train_set, NUM_SAMPLES) if launch.is_main else None
        self.sums: dict[str, tuple[Tensor, int]] = {}  # metric -> (sum, steps that reported it) since the last log
        self.count = 0
        n_params = sum(p.numel() for p in self.params)
        start = f"resuming {found[0]}" if found else "starting"
        self.start(f"stage {self.stage}: {start}; {len(train_set)} train / {len(holdout)} holdout images, "
                   f"{n_params / 1e6:.2f}M trainable params, {launch.world_size} x {self.device}, "
                   f"{self.precision.describe()}")  # fmt: skip
        self.probe_set = self._probe_set(t.probe) if launch.is_main and t.probe.data else None

    # ---------------------------------------------------------------- the step

    def run_step(self) -> None:
        batch = self.stream.next_usable()
        for k, v in self.train_step(batch["image"].to(self.device, non_blocking=True)).items():
            total, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v.detach().float(), n + 1)
        self.count += 1

    def _lr(self) -> float:
        o = self.t.optim
        return scheduled_lr(self.step, self.total, o.lr, o.warmup_steps, o.schedule, o.min_lr_ratio)

    def train_step(self, images: Tensor) -> dict[str, Tensor]:
        """One optimizer step of the stage (+ the objective's step after it, e.g. the discriminator's) -> metrics."""
        out = self.runner.micro_step(lambda forward: self.objective.loss(forward, images, self.step), 0, 1)
        metrics = {k: v for k, v in out.items() if k != "recon"}
        metrics["grad_norm"] = self.runner.optimizer_step(self._lr())
        metrics.update(self.objective.after_step(images, out, self.step))
        if self.ema is not None:
            self.ema.update(self.step)
        return metrics

    # ---------------------------------------------------------------- outputs

    def log_record(self, seconds: float, skipped: int) -> tuple[dict[str, Any], str, dict[str, str]] | None:
        sums, count, self.sums, self.count = self.sums, self.count, {}, 0
        if not self.launch.is_main or count == 0:
            return None
        record = {"step": self.step, "stage": self.stage, "epoch": self.stream.seen // self.stream.per_epoch,
                  **{k: (total / n).item() for k, (total, n) in sums.items()},
                  "lr": self.opt.param_groups[0]["lr"], "num_skipped": skipped,
                  "num_skipped_total": self.stream.skips.num_skipped, "sec_per_step": seconds / count}  # fmt: skip
        line = f"step {self.step}/{self.t.steps} loss {record['loss']:.4f} {record['sec_per_step']:.3f} s/step"
        return record, line, {"loss": f"{record['loss']:.4f}"}

    def periodic_eval(self) -> None:
        if self.samples is not None:
            self.evaluate()

    def _probe_set(self, p: ProbeConfig) -> ProbeSet:
        try:
            probe = ProbeSet(p.data, self.cfg.image_size, p.images, epochs=p.epochs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"train.probe.data: {' '.join(str(err).split())}") from None
        if self.step == 0:  # the teacher does not train: its row once, at the start of a fresh run
            self.log.write({"step": 0, **probe.scores(self.raw, ("teacher",))})
        return probe

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Holdout images through the (EMA) model, by the stage's objective (stage 1: cosine to the teacher; 2 / 2b:
        L1, PSNR and `samples/step-XXXXXX.png`), appended to log.jsonl."""
        with self.ema.applied() if self.ema is not None else nullcontext():
            record = self.objective.evaluate(self.samples.to(self.device), self.out, self.step)
            if self.probe_set is not None:
                record.update(self.probe_set.scores(self.raw, self.t.probe.representations))
        self.log.write({"step": self.step, **record})
        return record

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        groups = {"model": self.raw.state_dict(), "optimizer": flatten_state(self.opt.state_dict())}
        if self.ema is not None:
            groups["ema"] = self.ema.state_dict()
        return {**groups, **self.objective.state()}, {}

    def load_state(self, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        self.raw.load_state_dict(groups["model"])
        restore_optimizer(self.opt, groups["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(groups["ema"])
        self.objective.load_state(groups)

    def export(self) -> Path:
        """`out_dir/model` = the trained tokenizer (EMA weights if enabled), written by rank 0."""
        path = self.out / "model"
        if self.launch.is_main:
            with self.ema.applied() if self.ema is not None else nullcontext():
                self.raw.save_pretrained(path)
        return path


def train(run: TokenizerRunConfig) -> Path:
    """Run (or resume) one stage of `run`; returns the exported model folder. Joins `torchrun`'s process group."""
    launch = Launch.detect(run.train.device)
    return run_training(launch, run.out_dir, lambda: TokenizerTrainer(run, launch))
