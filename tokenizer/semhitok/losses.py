"""Tokenizer objectives. Every function returns `dict[str, Tensor]` of *unweighted* terms; the training loop
multiplies them by the weights in `SemanticConfig` / `PixelConfig` / `LossConfig`, sums and logs.

- semantic (stage 1): (1 - cos) and L1 between the decoded and the teacher features (DESIGN §3.1).
- pixel (stage 2): L1 + perceptual + PatchGAN hinge with VQGAN's adaptive weight, off before `disc_start`.
- vq (stage 2): the quantizer's own unweighted terms; `vq_loss` is the one place that knows which `PixelConfig`
  weight each term name takes (`VQ_LOSS_WEIGHTS`), and unknown names are an error, never silently weighted.
- perceptual: pluggable (`PerceptualLoss`). LPIPS backbone weights are not available offline, so the built-in one
  is `InceptionPerceptualLoss`: LPIPS-style distance (channel-unit-normalised activations, squared difference,
  spatial mean, uniform layer weights, no learned linear heads) on the real ImageNet Inception-v3's stages.
  Results must say which perceptual network was used.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semhitok.config import ConfigError, LossConfig, PixelConfig, TeacherConfig
from semhitok.modules import NLayerDiscriminator
from semhitok.teachers import INCEPTION_INPUT, InceptionTeacher


def semantic_loss(recon: Tensor, target: Tensor) -> dict[str, Tensor]:
    """recon, target (B, L, D) -> {"cosine": mean(1 - cos), "l1": mean |recon - target|, "mse": mean squared error}."""
    recon, target = recon.float(), target.float()
    cosine = 1.0 - F.cosine_similarity(recon, target, dim=-1).mean()
    return {"cosine": cosine, "l1": F.l1_loss(recon, target), "mse": F.mse_loss(recon, target)}


class PerceptualLoss(Protocol):
    def __call__(self, recon: Tensor, target: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scalar distance, differentiable w.r.t. recon."""
        ...


class InceptionPerceptualLoss(nn.Module):
    """LPIPS-style distance on the frozen Inception-v3's activations (see the module docstring)."""

    def __init__(self, network: InceptionTeacher, layers: tuple[str, ...] = ("mixed_2", "mixed_5", "mixed_7", "mixed_10"),
                 image_size: int = INCEPTION_INPUT):  # fmt: skip
        super().__init__()
        self.network, self.layers, self.image_size = network, tuple(layers), image_size

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """The network runs only up to the deepest named layer, on images resized to `image_size`."""
        with torch.no_grad():
            want = self.network.feature_maps(target, self.layers, self.image_size)
        got = self.network.feature_maps(recon, self.layers, self.image_size)
        return sum(_normalized_distance(got[k], want[k]) for k in self.layers) / len(self.layers)


def _normalized_distance(a: Tensor, b: Tensor) -> Tensor:
    a, b = F.normalize(a, dim=1, eps=1e-10), F.normalize(b, dim=1, eps=1e-10)  # unit length over channels
    return (a - b).pow(2).sum(1).mean()


PERCEPTUAL_NETWORKS = ("inception", "none")


def build_perceptual_loss(cfg: LossConfig, inception: InceptionTeacher | None = None) -> PerceptualLoss | None:
    """The configured perceptual network (None for "none"); pass `inception` to share an already loaded one."""
    if cfg.perceptual not in PERCEPTUAL_NETWORKS:
        raise ConfigError(f"loss.perceptual: {cfg.perceptual!r} is not one of {list(PERCEPTUAL_NETWORKS)}")
    if cfg.perceptual == "none":
        return None
    network = inception or InceptionTeacher(TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=INCEPTION_INPUT), grid=1)
    if cfg.perceptual_image_size < 75:  # Inception-v3's smallest valid input
        raise ConfigError(f"loss.perceptual_image_size must be >= 75 for Inception-v3, got {cfg.perceptual_image_size}")
    return InceptionPerceptualLoss(network, cfg.perceptual_layers, cfg.perceptual_image_size)


def pixel_losses(recon: Tensor, target: Tensor, perceptual: PerceptualLoss | None = None) -> dict[str, Tensor]:
    """images (B, 3, H, W) -> {"l1", "perceptual"} (perceptual is 0 when no network is given)."""
    zero = recon.new_zeros(())
    return {"l1": F.l1_loss(recon, target), "perceptual": perceptual(recon, target) if perceptual else zero}


# Every loss term a stage-2 quantizer reports -> the PixelConfig weight it is trained with (None: reported only).
VQ_LOSS_WEIGHTS: Mapping[str, str | None] = MappingProxyType({
    "codebook": "codebook_weight",  # flat / shared baselines: their one joint codebook
    "commit": "commit_weight",
    "texture/codebook": "codebook_weight",  # hierarchical: the texture sub-codebooks
    "texture/commit": "commit_weight",
    "semantic/commit": None,  # hierarchical: the semantic level is frozen in stage 2, so it carries no gradient
})  # fmt: skip


def vq_loss(terms: Mapping[str, Tensor], p: PixelConfig) -> Tensor:
    """A stage-2 quantizer's unweighted `losses` -> their weighted sum (weights `VQ_LOSS_WEIGHTS` from `p`).
    A term without an entry is a ConfigError naming it and the known terms."""
    unknown = sorted(set(terms) - set(VQ_LOSS_WEIGHTS))
    if unknown:
        raise ConfigError(f"quantizer loss term(s) {unknown} have no weight; known: {sorted(VQ_LOSS_WEIGHTS)}")
    return sum(getattr(p, VQ_LOSS_WEIGHTS[k]) * v for k, v in terms.items() if VQ_LOSS_WEIGHTS[k] is not None)


def build_discriminator(cfg: LossConfig) -> NLayerDiscriminator:
    """The PatchGAN of the loss config (trained by the loop's own optimizer; not part of the tokenizer)."""
    return NLayerDiscriminator(cfg.disc_ch, cfg.disc_layers)


def gan_active(step: int, cfg: LossConfig) -> bool:
    """The GAN terms start after the warm-up (`disc_start` steps)."""
    return step >= cfg.disc_start


def d_loss(logits_real: Tensor, logits_fake: Tensor) -> dict[str, Tensor]:
    """Hinge loss of the discriminator; pass `fake` images detached. -> {"d_loss", "logits_real", "logits_fake"}."""
    loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return {"d_loss": loss, "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}


def g_loss(logits_fake: Tensor) -> dict[str, Tensor]:
    """Generator hinge term: -mean D(fake)."""
    return {"g_loss": -logits_fake.mean()}


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: |grad rec_loss| / |grad gan_loss| at the decoder's last layer, clamped, detached.

    The training loop adds `gan_weight * adaptive_weight * g_loss` (and 0 before `disc_start`)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
