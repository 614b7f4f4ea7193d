"""SemHiTok tokenizer configuration: frozen dataclasses, named presets, strict dict round trip.

Every *(choice)* of DESIGN.md §3 is a field here, never a constant in model code. `SemHiTokConfig.to_dict()`
is what `config.json` holds next to `model.safetensors`; `from_dict` refuses unknown and missing keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from semhitok.runtime.configio import ConfigError
from semhitok.runtime.configio import from_dict as _from_dict
from semhitok.runtime.configio import to_dict as _to_dict

TeacherKind = Literal["inception", "open_clip", "hf_siglip", "tiny_vit"]
INCEPTION_LAYERS = {"mixed_7": 768, "mixed_10": 2048}  # name -> channels (17x17 and 8x8 maps at 299 px)
VIT_LAYERS = ("penultimate", "last")
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher whose patch features the semantic branch distils (DESIGN §3.1).

    `mean`/`std` normalise [0, 1] pixels for ViT teachers; the Inception adapter uses its asset's fixed
    `(x - 128) / 128` instead. `patch_size`, `depth`, `heads`, `seed` are read by `tiny_vit` only."""

    kind: TeacherKind = "tiny_vit"
    name: str = ""  # open_clip model name, e.g. "ViT-L-16-SigLIP-256"
    path: str = ""  # local weights: open_clip file or `open_clip_config.json` folder, HF folder, Inception .pt
    layer: str = "penultimate"  # ViTs: "penultimate" | "last"; inception: "mixed_7" | "mixed_10"
    dim: int = 32  # D_teacher; checked against the built teacher
    image_size: int = 32  # the teacher's input resolution; images are resized to it
    mean: tuple[float, float, float] = SIGLIP_MEAN_STD
    std: tuple[float, float, float] = SIGLIP_MEAN_STD
    resample: Literal["area", "bilinear"] = "area"  # teacher feature map -> token grid
    patch_size: int = 8
    depth: int = 2
    heads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        layers = tuple(INCEPTION_LAYERS) if self.kind == "inception" else VIT_LAYERS
        _check(self.layer in layers, f"teacher.layer {self.layer!r} is not valid for kind {self.kind!r}; use one of {layers}")
        if self.kind == "inception":
            want = INCEPTION_LAYERS[self.layer]
            _check(self.dim == want, f"teacher.dim must be {want} for Inception layer {self.layer}, got {self.dim}")
        _check(self.kind != "open_clip" or bool(self.name or self.path), "open_clip teacher needs `name` or a `path` folder")
        _check(self.kind != "hf_siglip" or bool(self.path), "hf_siglip teacher needs `path` (a local HF folder)")


@dataclass(frozen=True)
class SemanticConfig:
    """Stage 1: ViT student -> task layer -> l2-normalised d_sem -> EMA cosine VQ (K codes) -> transformer decoder."""

    width: int = 1024
    depth: int = 12
    heads: int = 16
    mlp_ratio: float = 4.0
    init_from_teacher: bool = True  # copy patch embedding + first `depth` blocks (ViT teacher) or the stem (Inception)
    stem: Literal["patch", "inception"] = "patch"  # the student's patch embedding (modules.PatchViT)
    d_sem: int = 32
    codebook_size: int = 16384  # K
    ema_decay: float = 0.99
    init: Literal["kmeans", "data", "random"] = "kmeans"
    init_batches: int = 1  # batches pooled before k-means / data init
    kmeans_iters: int = 10
    dead_code_threshold: float = 1.0  # a code whose EMA cluster size falls below this is restarted (0 = never)
    decoder_width: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    l1_weight: float = 1.0  # lambda in (1 - cos) + lambda * L1
    commit_weight: float = 0.25  # beta
    # "raw": the paper's (1 - cos) + lambda * L1 to the teacher's features. "whitened": MSE to the teacher's top
    # `target_dims` principal components, each scaled to unit variance (fitted once on `target_fit_images` training
    # images and saved with the model), so a low-variance direction (object shape) weighs as much as the dominant
    # ones (colour, layout) instead of a cosine they barely move.
    target: Literal["raw", "whitened"] = "raw"
    target_dims: int = 64
    target_fit_images: int = 1024

    def __post_init__(self) -> None:
        _check(self.width % self.heads == 0, f"semantic.width {self.width} not divisible by heads {self.heads}")
        _check(self.decoder_width % self.decoder_heads == 0, "semantic.decoder_width not divisible by decoder_heads")
        _check(0.0 <= self.ema_decay < 1.0, f"semantic.ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.target_dims >= 1 and self.target_fit_images >= 1, "semantic.target_dims and target_fit_images must be >= 1")


@dataclass(frozen=True)
class PixelConfig:
    """Stage 2: pixel encoder -> l2-normalised d_pix -> texture codes -> VQGAN decoder (2b: the enhance decoder).

    `ch`, `ch_mult`, `num_res_blocks` shape both the CNN encoder (if chosen) and the pixel decoder; the token grid
    must sit 2**(len(ch_mult) - 1) times below the image size."""

    encoder: Literal["vit", "cnn"] = "vit"
    width: int = 768  # ViT pixel encoder
    depth: int = 12
    heads: int = 12
    d_pix: int = 8
    sub_codebook_size: int = 12  # m texture codes per semantic code
    codebook_weight: float = 1.0
    commit_weight: float = 0.25
    dead_code_ratio: float = 0.03  # texture code (i, j) restarts when its EMA count < ratio * mean count of row i
    semantic_proj_dim: int = 32  # semantic code vector is projected to this before the channel concat
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    enhance_ch: int = 256
    enhance_num_res_blocks: int = 4
    enhance_ch_mult: tuple[int, ...] | None = None  # the enhance decoder's own ch_mult (same length); None = ch_mult
    use_enhance_decoder: bool = False  # set by SemHiTok.use_enhance_decoder() (stage 2b)

    def __post_init__(self) -> None:
        _check(self.width % self.heads == 0, f"pixel.width {self.width} not divisible by heads {self.heads}")
        _check(len(self.ch_mult) >= 1, "pixel.ch_mult must not be empty")
        _check(self.enhance_ch_mult is None or len(self.enhance_ch_mult) == len(self.ch_mult),
               f"pixel.enhance_ch_mult {self.enhance_ch_mult} must have as many levels as ch_mult {self.ch_mult} "
               "(the same upsampling)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class QuantizerConfig:
    """Which stage-2 codebook: SemHiTok's hierarchy, or a baseline with the same K*m vocabulary (DESIGN §3.2)."""

    kind: Literal["hierarchical", "flat", "shared"] = "hierarchical"
    shared_weights: tuple[float, float] = (1.0, 1.0)  # "shared": (semantic, pixel) distance weights
    dead_code_threshold: float = 1.0  # "flat" / "shared": EMA count below which a code restarts


@dataclass(frozen=True)
class LossConfig:
    """Weights and settings of the stage-2 pixel objective (the training loop multiplies the unweighted terms)."""

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: Literal["inception", "none"] = "inception"  # LPIPS weights are not available offline
    perceptual_layers: tuple[str, ...] = ("mixed_2", "mixed_5", "mixed_7", "mixed_10")
    perceptual_image_size: int = 299  # side the images are resized to for the perceptual network (Inception: 299)
    gan_weight: float = 0.5
    gan_adaptive_weight: bool = True  # VQGAN's balance by gradient norms; False: gan_weight alone (LlamaGen's default)
    disc_start: int = 20000  # generator/discriminator GAN terms are off before this step
    disc_ch: int = 64
    disc_layers: int = 3
    adaptive_weight_max: float = 1e4


@dataclass(frozen=True)
class SemHiTokConfig:
    """The whole tokenizer: image size, token grid (h = w = grid), both branches and the codebook kind."""

    image_size: int = 256
    grid: int = 16
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    pixel: PixelConfig = field(default_factory=PixelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        _check(self.image_size % self.grid == 0, f"image_size {self.image_size} is not a multiple of grid {self.grid}")
        _check(
            self.pixel.downsample == self.patch_size,
            f"pixel.ch_mult {self.pixel.ch_mult} gives a {self.pixel.downsample}x decoder but image_size/grid = "
            f"{self.patch_size}; use len(ch_mult) = {self.patch_size.bit_length()}",
        )
        _check(
            self.semantic.target != "whitened" or self.semantic.target_dims <= self.teacher.dim,
            f"semantic.target_dims {self.semantic.target_dims} exceeds the teacher's {self.teacher.dim} dimensions",
        )
        _check(
            self.semantic.stem != "inception" or (self.patch_size >= 8 and self.patch_size & (self.patch_size - 1) == 0),
            f"semantic.stem inception tiles the image in 8 x 2**n px patches; image_size / grid = {self.patch_size}",
        )

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid

    @property
    def K(self) -> int:  # noqa: N802 (glossary name)
        return self.semantic.codebook_size

    @property
    def m(self) -> int:
        return self.pixel.sub_codebook_size

    @property
    def vocab_size(self) -> int:
        """K * m image indices; flat index f = i * m + j."""
        return self.K * self.m

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def fingerprint_dict(self) -> dict[str, Any]:
        """`to_dict` without the keys of `FINGERPRINT_NEUTRAL` at their ADDED_KEYS value: what identifies the model."""
        data = self.to_dict()
        for section, key in FINGERPRINT_NEUTRAL:
            if data[section].get(key, ADDED_KEYS[section, key]) == ADDED_KEYS[section, key]:
                data[section].pop(key, None)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SemHiTokConfig:
        """Strict inverse of `to_dict`: unknown or missing keys raise ConfigError naming them (dotted); a key added
        after a checkpoint was saved (`ADDED_KEYS`) reads as the value that reproduces the model it saved."""
        data = _with_added_keys(data)
        _require_all_keys(cls, data, "")
        return _from_dict(cls, data)


# Keys added to SemHiTokConfig after checkpoints were shipped: (section, key) -> the value every earlier model had.
ADDED_KEYS: Mapping[tuple[str, str], Any] = types.MappingProxyType({
    ("semantic", "stem"): "patch",
    ("semantic", "target"): "raw",
    ("semantic", "target_dims"): SemanticConfig.target_dims,
    ("semantic", "target_fit_images"): SemanticConfig.target_fit_images,
    ("loss", "perceptual_image_size"): 299,
    ("pixel", "enhance_ch_mult"): None,
    ("loss", "gan_adaptive_weight"): True,
})  # fmt: skip


# Keys of ADDED_KEYS added after code caches were fingerprinted (`mllm.codes.tokenizer_fingerprint` hashes
# `fingerprint_dict`): at their ADDED_KEYS value they are left out, so a model they do not change keeps the fingerprint
# its caches recorded. (Keys added earlier stay in: caches made since hashed them.)
FINGERPRINT_NEUTRAL: tuple[tuple[str, str], ...] = (("pixel", "enhance_ch_mult"), ("loss", "gan_adaptive_weight"))


def _with_added_keys(data: Any) -> Any:
    if not isinstance(data, Mapping):
        return data
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(data.get(section), dict):
            data[section].setdefault(key, value)
    return data


def _require_all_keys(cls: type, data: Any, where: str) -> None:
    """A saved config must be complete: defaults silently filling a missing key would change the model."""
    if not isinstance(data, Mapping):
        return  # from_dict reports the type error
    hints = typing.get_type_hints(cls)
    missing = [f"{where}{f.name}" for f in dataclasses.fields(cls) if f.name not in data]
    if missing:
        raise ConfigError(f"missing key(s) {missing} for {cls.__name__}")
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _require_all_keys(hints[f.name], data[f.name], f"{where}{f.name}.")


def _paper_256() -> SemHiTokConfig:
    """SigLIP-large-patch16-256 (open_clip) teacher, 16x16 grid at 256 px, K = 16384, m = 12."""
    teacher = TeacherConfig(kind="open_clip", name="ViT-L-16-SigLIP-256", dim=1024, image_size=256)
    return SemHiTokConfig(image_size=256, grid=16, teacher=teacher)


def _inception_128() -> SemHiTokConfig:
    """The real Inception-v3 teacher (mixed_7 area-resampled to 8x8) and a CPU-trainable student at 128 px."""
    teacher = TeacherConfig(kind="inception", layer="mixed_7", dim=768, image_size=299)
    semantic = SemanticConfig(
        width=256, depth=4, heads=4, init_from_teacher=False, codebook_size=1024,
        decoder_width=256, decoder_depth=2, decoder_heads=4,
    )
    pixel = PixelConfig(
        width=256, depth=4, heads=4, sub_codebook_size=8, ch=32, num_res_blocks=1,
        enhance_ch=64, enhance_num_res_blocks=2,
    )
    return SemHiTokConfig(image_size=128, grid=8, teacher=teacher, semantic=semantic, pixel=pixel)


def _tiny() -> SemHiTokConfig:
    """Tiny everything (tiny_vit teacher, 32 px, 4x4 grid, K = 32, m = 4): for tests."""
    teacher = TeacherConfig(kind="tiny_vit", dim=32, image_size=32, patch_size=8, depth=2, heads=2)
    semantic = SemanticConfig(
        width=32, depth=2, heads=2, d_sem=8, codebook_size=32, dead_code_threshold=0.5,
        decoder_width=32, decoder_depth=1, decoder_heads=2,
    )
    pixel = PixelConfig(
        width=32, depth=1, heads=2, d_pix=4, sub_codebook_size=4, semantic_proj_dim=8, ch=16, ch_mult=(1, 2, 2, 2),
        num_res_blocks=1, enhance_ch=32, enhance_num_res_blocks=2,
    )
    loss = LossConfig(perceptual="none", disc_ch=16, disc_layers=2, disc_start=0)
    return SemHiTokConfig(image_size=32, grid=4, teacher=teacher, semantic=semantic, pixel=pixel, loss=loss)


PRESETS: Mapping[str, SemHiTokConfig] = types.MappingProxyType(
    {"semhitok-paper-256": _paper_256(), "semhitok-inception-128": _inception_128(), "semhitok-tiny": _tiny()}
)
