"""Tokenizer training objectives, one per stage (DESIGN §3), chosen by `train.stage` through `OBJECTIVES`.

An objective says what trains (`params`), the loss of one step (`loss` -> dict with "loss"), what runs after the
optimizer step (stages 2 / 2b: the PatchGAN discriminator's step), its extra checkpoint groups and the holdout
evaluation. The shared run loop (`semhitok.runtime.trainer`) does the rest.

"1": semantic distillation (cosine + L1 to the teacher + commitment); "2": the pixel branch with the semantic branch
frozen (L1 + perceptual + VQ terms + PatchGAN, adaptive weight, off before `loss.disc_start`); "2b": stage 2's
objective with the enhance decoder swapped in and only that trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from semhitok.config import PixelConfig, SemanticConfig, SemHiTokConfig
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
from semhitok.model import SemHiTok
from semhitok.runtime import (
    ConfigError,
    Launch,
    ResolvedPrecision,
    flatten_state,
    restore_optimizer,
    to_pil,
    wrap_ddp,
)
from semhitok.types import QuantizerOutput


def image_grid(rows: list[Tensor]) -> Image.Image:
    """Rows of images (n, 3, H, W) in [-1, 1] -> one PIL image, each row's images side by side."""
    return to_pil(torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1))


def stage1_objective(out: dict[str, Any], s: SemanticConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(1 - cos) + l1_weight * L1 to the teacher's features (target raw), or MSE to their whitened principal
    components (target whitened); + commit_weight * commitment -> (loss, metrics)."""
    q: QuantizerOutput = out["quantizer"]
    terms = semantic_loss(out["semantic_recon"], out["semantic_target"])
    distill = terms["mse"] if s.target == "whitened" else terms["cosine"] + s.l1_weight * terms["l1"]
    loss = distill + s.commit_weight * q.losses["commit"]
    return loss, {"loss": loss, **{f"semantic/{k}": v for k, v in {**terms, **q.losses, **q.stats}.items()}}


def vq_objective(q: QuantizerOutput, p: PixelConfig) -> Tensor:
    """Weighted stage-2 codebook + commitment terms; `losses.vq_loss` owns which weight each term name takes."""
    return vq_loss(q.losses, p)


def _codebook_names(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hierarchical terms are already 'semantic/...' and 'texture/...'; a baseline's single codebook: 'codebook/...'."""
    return {k if "/" in k else f"codebook/{k}": v for k, v in terms.items()}


def clip_norm(params: list[nn.Parameter], clip: float) -> Tensor:
    return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)


class StageObjective:
    """One stage's objective over `model` (the bare SemHiTok). Building it freezes / swaps the stage's parts."""

    stage = ""

    def __init__(self, model: SemHiTok, cfg: SemHiTokConfig, optim: Any, precision: ResolvedPrecision,
                 device: torch.device):  # fmt: skip
        self.model, self.cfg, self.optim, self.precision, self.device = model, cfg, optim, precision, device
        self.prepare()
        trainable = {id(p) for p in model.stage_parameters(self.stage)}
        for p in model.parameters():  # everything outside the stage is frozen (so DDP sees no unused parameters)
            p.requires_grad_(id(p) in trainable)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def prepare(self) -> None:
        """Freeze / swap parts of the model before the stage's parameters are collected."""

    @property
    def fit_images(self) -> int:
        """Training images a fresh run hands to `fit_targets` before its first step (0: none needed)."""
        return 0

    def fit_targets(self, images: Tensor) -> None:
        """A fresh run's data-dependent set-up before its first step (stage 1: the target whitener)."""

    def loss(self, forward: nn.Module, images: Tensor, step: int) -> dict[str, Tensor]:
        """images (B, 3, H, W) -> {"loss", metrics...} (+ "recon" for the step after the optimizer's)."""
        raise NotImplementedError

    def after_step(self, images: Tensor, out: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """What runs after the optimizer step of `step` -> more metrics."""
        return {}

    def wrap(self, launch: Launch) -> None:
        """Wrap extra trained modules for data parallelism (after a resume loaded them)."""

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_state(self, groups: dict[str, dict[str, Tensor]]) -> None:
        pass

    def evaluate(self, x: Tensor, out_dir: Path, step: int) -> dict[str, float]:
        raise NotImplementedError


class SemanticDistillation(StageObjective):
    """Stage 1: the semantic branch distils the teacher through the EMA VQ."""

    stage = "1"

    def loss(self, forward: nn.Module, images: Tensor, step: int) -> dict[str, Tensor]:
        return stage1_objective(forward(images), self.cfg.semantic)[1]

    @property
    def fit_images(self) -> int:
        return self.cfg.semantic.target_fit_images if self.model.target_whitener is not None else 0

    def fit_targets(self, images: Tensor) -> None:
        """A fresh run with `semantic.target: whitened` fits the target whitener on these training images first."""
        self.model.fit_target_whitener(images.to(self.device))

    def evaluate(self, x: Tensor, out_dir: Path, step: int) -> dict[str, float]:
        """The holdout's mean cosine and MSE to the target (stage 1 has no meaningful pixel decoder)."""
        self.model.eval()
        out = self.model.semantic_forward(x)
        self.model.train()
        terms = semantic_loss(out["semantic_recon"], out["semantic_target"])
        return {"holdout/semantic_cosine": 1.0 - terms["cosine"].item(), "holdout/semantic_mse": terms["mse"].item()}


class PixelReconstruction(StageObjective):
    """Stage 2: the pixel branch over the frozen semantic branch, with a PatchGAN discriminator of its own."""

    stage = "2"

    def __init__(self, model: SemHiTok, cfg: SemHiTokConfig, optim: Any, precision: ResolvedPrecision,
                 device: torch.device):  # fmt: skip
        super().__init__(model, cfg, optim, precision, device)
        self.raw_disc = build_discriminator(cfg.loss).to(device)
        self.disc: nn.Module = self.raw_disc
        self.opt_d = torch.optim.AdamW(self.raw_disc.parameters(), lr=optim.disc_lr, betas=optim.betas,
                                       weight_decay=optim.weight_decay)  # fmt: skip
        perceptual = build_perceptual_loss(cfg.loss)
        self.perceptual = perceptual.to(device) if perceptual is not None else None

    def prepare(self) -> None:
        self.model.freeze_semantic()

    def loss(self, forward: nn.Module, images: Tensor, step: int) -> dict[str, Tensor]:
        out = forward(images)
        lc, recon, q = self.cfg.loss, out["recon"], out["quantizer"]
        terms = pixel_losses(recon, images, self.perceptual)
        rec = lc.l1_weight * terms["l1"] + lc.perceptual_weight * terms["perceptual"]
        loss = rec + vq_objective(q, self.cfg.pixel)
        metrics = {**terms, **_codebook_names(q.losses), **_codebook_names(q.stats)}
        if gan_active(step, lc):
            self.raw_disc.requires_grad_(False)  # generator step: gradients reach the image only
            g = g_loss(self.raw_disc(recon))["g_loss"]
            w = (adaptive_weight(rec, g, self.model.last_decoder_layer, lc.adaptive_weight_max) if lc.gan_adaptive_weight
                 else torch.ones((), device=g.device))
            loss = loss + lc.gan_weight * w * g
            metrics.update(g_loss=g, adaptive_weight=w)
        return {"loss": loss, **metrics, "recon": recon}

    def after_step(self, images: Tensor, out: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """One discriminator step once the GAN is on."""
        if not gan_active(step, self.cfg.loss):
            return {}
        self.raw_disc.requires_grad_(True)
        with self.precision.autocast(self.device):
            terms = d_loss(self.disc(images), self.disc(out["recon"].detach()))
        self.opt_d.zero_grad(set_to_none=True)
        terms["d_loss"].backward()
        terms["disc_grad_norm"] = clip_norm(list(self.raw_disc.parameters()), self.optim.grad_clip)
        self.opt_d.step()
        return terms

    def wrap(self, launch: Launch) -> None:
        self.disc = wrap_ddp(self.raw_disc, launch)

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"disc": self.raw_disc.state_dict(), "disc_optimizer": flatten_state(self.opt_d.state_dict())}

    def load_state(self, groups: dict[str, dict[str, Tensor]]) -> None:
        self.raw_disc.load_state_dict(groups["disc"])
        restore_optimizer(self.opt_d, groups["disc_optimizer"])

    def evaluate(self, x: Tensor, out_dir: Path, step: int) -> dict[str, float]:
        """L1 and PSNR of encode -> decode; writes `samples/step-XXXXXX.png` (originals over reconstructions)."""
        recon = self.model.decode(self.model.encode(x))
        record = {"holdout/l1": F.l1_loss(recon, x).item(), "holdout/psnr": psnr(recon, x, max_db=100.0).mean().item()}
        (out_dir / "samples").mkdir(exist_ok=True)
        image_grid([x, recon]).save(out_dir / "samples" / f"step-{step:06d}.png")
        return record


class EnhanceDecoder(PixelReconstruction):
    """Stage 2b: stage 2's objective training only the (new, wider) enhance decoder."""

    stage = "2b"

    def prepare(self) -> None:
        super().prepare()
        self.model.use_enhance_decoder()


OBJECTIVES: dict[str, type[StageObjective]] = {o.stage: o for o in (SemanticDistillation, PixelReconstruction,
                                                                    EnhanceDecoder)}  # fmt: skip


def build_objective(stage: str, model: SemHiTok, cfg: SemHiTokConfig, optim: Any, precision: ResolvedPrecision,
                    device: torch.device) -> StageObjective:  # fmt: skip
    """The objective of `stage`; ConfigError names an unknown stage."""
    if stage not in OBJECTIVES:
        raise ConfigError(f"train.stage must be one of {list(OBJECTIVES)}, got {stage!r}")
    return OBJECTIVES[stage](model, cfg, optim, precision, device)
