"""`SemHiTok`: the tokenizer model (DESIGN §3).

Semantic branch (stage 1): student ViT at the token grid -> Linear-Tanh-Linear task layer -> l2-normalised d_sem ->
EMA cosine VQ (K codes) -> small transformer decoder back to the teacher's features.
Pixel branch (stage 2): ViT or CNN encoder on the same grid -> l2-normalised d_pix -> stage-2 quantizer
(hierarchical sub-codebooks, or the flat / shared baselines) -> VQGAN decoder on concat(proj(semantic code), texture
code). Stage 2b swaps in the wider "enhance" decoder and freezes everything else.

The teacher is held outside the module tree: it is never saved, never in `parameters()`, never wrapped by
DDP; it is rebuilt from the config on first use (or passed in) and follows the input's device.
Losses live in `losses.py`; the training loop weights them. Checkpoints are `config.json` + `model.safetensors`;
`save_pretrained(..., training_only=False)` leaves out the parts only stage 1's loss uses (`TRAINING_ONLY`: the
semantic decoder) and names them in the file's metadata, so an inference package encodes and decodes, and refuses
stage-1 training and serving as another stage's `init_from`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from semhitok.config import ConfigError, SemHiTokConfig
from semhitok.modules import Decoder, Encoder, FeatureWhitener, PatchViT, TokenDecoder
from semhitok.quantizers import (
    EMAQuantizer,
    FlatQuantizer,
    HierarchicalQuantizer,
    SharedIndexQuantizer,
    SubCodebookQuantizer,
)
from semhitok.runtime.atomic import atomic_folder
from semhitok.teachers import Teacher, build_teacher
from semhitok.types import QuantizerOutput, TokenGrid

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STAGES = ("1", "2", "2b")
TRAINING_ONLY = ("semantic_decoder",)  # stage 1's feature decoder: its loss needs it, encode / decode never do
OMITTED_KEY = "omitted"  # model.safetensors metadata: the TRAINING_ONLY parts a checkpoint leaves out, comma-separated


# ------------------------------------------------------------------------------------------------- builders


def build_semantic_quantizer(cfg: SemHiTokConfig) -> EMAQuantizer:
    s = cfg.semantic
    return EMAQuantizer(s.codebook_size, s.d_sem, s.ema_decay, s.init, s.init_batches, s.kmeans_iters,
                        s.dead_code_threshold)


def _hierarchical_quantizer(cfg: SemHiTokConfig) -> HierarchicalQuantizer:
    p = cfg.pixel
    texture = SubCodebookQuantizer(cfg.K, cfg.m, p.d_pix, p.dead_code_ratio, cfg.semantic.ema_decay)
    return HierarchicalQuantizer(semantic=build_semantic_quantizer(cfg), texture=texture)


def _flat_quantizer(cfg: SemHiTokConfig) -> FlatQuantizer:
    dims, q = (cfg.semantic.d_sem, cfg.pixel.d_pix), cfg.quantizer
    return FlatQuantizer(cfg.vocab_size, dims, q.dead_code_threshold, cfg.semantic.ema_decay)


def _shared_quantizer(cfg: SemHiTokConfig) -> SharedIndexQuantizer:
    dims, q = (cfg.semantic.d_sem, cfg.pixel.d_pix), cfg.quantizer
    return SharedIndexQuantizer(cfg.vocab_size, dims, q.shared_weights, q.dead_code_threshold, cfg.semantic.ema_decay)


STAGE2_QUANTIZERS: Mapping[str, Callable[[SemHiTokConfig], nn.Module]] = MappingProxyType({
    "hierarchical": _hierarchical_quantizer,  # owns the semantic EMA VQ
    "flat": _flat_quantizer,
    "shared": _shared_quantizer,
})  # fmt: skip


def _vit_pixel_encoder(cfg: SemHiTokConfig) -> nn.Module:
    p = cfg.pixel
    return nn.Sequential(PatchViT(cfg.image_size, cfg.patch_size, p.width, p.depth, p.heads), nn.Linear(p.width, p.d_pix))


def _cnn_pixel_encoder(cfg: SemHiTokConfig) -> nn.Module:
    p = cfg.pixel
    return nn.Sequential(Encoder(p.ch, p.ch_mult, p.num_res_blocks, p.d_pix), Rearrange("b c h w -> b (h w) c"))


PIXEL_ENCODERS: Mapping[str, Callable[[SemHiTokConfig], nn.Module]] = MappingProxyType({
    "vit": _vit_pixel_encoder,
    "cnn": _cnn_pixel_encoder,
})  # fmt: skip


def _pick(registry: Mapping[str, Callable], key: str, name: str) -> Callable:
    """registry[name], or a one-line ConfigError naming `key` and the known names."""
    if name not in registry:
        raise ConfigError(f"{key}: {name!r} is not one of {sorted(registry)}")
    return registry[name]


def build_stage2_quantizer(cfg: SemHiTokConfig) -> nn.Module:
    """hierarchical | flat | shared (`STAGE2_QUANTIZERS`); all index K*m codes."""
    return _pick(STAGE2_QUANTIZERS, "quantizer.kind", cfg.quantizer.kind)(cfg)


def build_pixel_encoder(cfg: SemHiTokConfig) -> nn.Module:
    """images (B, 3, H, W) -> (B, L, d_pix) (not yet normalised); vit | cnn (`PIXEL_ENCODERS`)."""
    return _pick(PIXEL_ENCODERS, "pixel.encoder", cfg.pixel.encoder)(cfg)


def build_pixel_decoder(cfg: SemHiTokConfig) -> Decoder:
    p = cfg.pixel
    if p.use_enhance_decoder:
        return Decoder(p.enhance_ch, p.enhance_ch_mult or p.ch_mult, p.enhance_num_res_blocks, p.semantic_proj_dim + p.d_pix)
    return Decoder(p.ch, p.ch_mult, p.num_res_blocks, p.semantic_proj_dim + p.d_pix)


# ---------------------------------------------------------------------------------------------------- model


class SemHiTok(nn.Module):
    """Image tokenizer: `encode` images -> TokenGrid, `decode` TokenGrid -> images, `code_embeddings` (per patch) and
    `code_table` (every code) for the MLLM. Training: `semantic_forward` (stage 1), `pixel_forward` (stages 2, 2b);
    `StageForward` wraps either as a module for DDP.

    `teacher`: an already built teacher to share (else built from the config on first use).
    `init_from_teacher=False` skips copying teacher blocks into the student even if the config asks for it
    (`from_pretrained` overwrites the weights anyway, and then needs no teacher)."""

    def __init__(self, config: SemHiTokConfig, teacher: Teacher | None = None, init_from_teacher: bool = True):
        super().__init__()
        self.config = config
        self._teacher = (teacher,) if teacher is not None else ()  # a tuple keeps it out of the module tree
        self._frozen: list[nn.Module] = []
        s, L = config.semantic, config.grid**2
        self.semantic_encoder = PatchViT(config.image_size, config.patch_size, s.width, s.depth, s.heads, s.mlp_ratio,
                                         s.stem)
        self.semantic_head = nn.Sequential(nn.Linear(s.width, s.width), nn.Tanh(), nn.Linear(s.width, s.d_sem))
        whitened = s.target == "whitened"
        self.target_whitener = FeatureWhitener(config.teacher.dim, s.target_dims) if whitened else None
        self.semantic_decoder = TokenDecoder(L, s.d_sem, s.decoder_width, s.decoder_depth, s.decoder_heads,
                                             s.target_dims if whitened else config.teacher.dim)
        self.quantizer = build_stage2_quantizer(config)
        if not isinstance(self.quantizer, HierarchicalQuantizer):
            self.stage1_quantizer = build_semantic_quantizer(config)  # baselines: semantic VQ of stage 1 only
        self.pixel_encoder = build_pixel_encoder(config)
        self.semantic_proj = nn.Linear(s.d_sem, config.pixel.semantic_proj_dim)
        self.pixel_decoder = build_pixel_decoder(config)
        if s.init_from_teacher and init_from_teacher:
            load_student_from_teacher(self.semantic_encoder, self.teacher.student_init_state())

    # ---------------------------------------------------------------- parts

    @property
    def teacher(self) -> Teacher:
        """The frozen teacher, built from the config on first use."""
        if not self._teacher:
            self._teacher = (build_teacher(self.config.teacher, self.config.grid),)
        return self._teacher[0]

    @property
    def semantic_quantizer(self) -> EMAQuantizer:
        """The stage-1 semantic EMA VQ (for "hierarchical" it is also level 1 of the stage-2 quantizer)."""
        return self.quantizer.semantic if isinstance(self.quantizer, HierarchicalQuantizer) else self.stage1_quantizer

    def semantic_modules(self) -> list[nn.Module]:
        parts = [self.semantic_encoder, self.semantic_head, self.semantic_quantizer, self.semantic_decoder,
                 self.target_whitener]
        return [m for m in parts if m is not None]

    @property
    def omitted(self) -> tuple[str, ...]:
        """The TRAINING_ONLY parts this model was loaded without (an inference package), else ()."""
        return tuple(name for name in TRAINING_ONLY if getattr(self, name) is None)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """Trainable parameters of a stage: "1" semantic branch, "2" pixel branch + stage-2 codebook,
        "2b" the (enhance) pixel decoder. Frozen parameters are never included."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "1":
            modules = self.semantic_modules()
        elif stage == "2":
            modules = [self.pixel_encoder, self.quantizer, self.semantic_proj, self.pixel_decoder]
        else:
            modules = [self.pixel_decoder]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    @property
    def last_decoder_layer(self) -> Tensor:
        """Weight of the pixel decoder's output conv, for the adaptive GAN weight."""
        return self.pixel_decoder.conv_out.weight

    # ---------------------------------------------------------------- freezing

    def freeze_semantic(self) -> None:
        """Stage 2: the semantic branch (encoder, task layer, EMA codebook, decoder) never changes again."""
        self._freeze(self.semantic_modules())

    def use_enhance_decoder(self) -> None:
        """Stage 2b: replace the pixel decoder by the enhance decoder, freeze everything else. A wider enhance decoder
        starts fresh; one of the same shape as stage 2's (`enhance_ch == ch`, same res blocks and ch_mult) starts from stage 2's
        weights, so 2b is then a decoder-only fine-tune on the frozen codes."""
        self.config = replace(self.config, pixel=replace(self.config.pixel, use_enhance_decoder=True))
        old = self.pixel_decoder
        weight = old.conv_out.weight
        self.pixel_decoder = build_pixel_decoder(self.config).to(device=weight.device, dtype=weight.dtype)
        before, after = old.state_dict(), self.pixel_decoder.state_dict()
        if before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before):
            self.pixel_decoder.load_state_dict(before)
        self._freeze([m for m in self.children() if m is not self.pixel_decoder])

    def _freeze(self, modules: list[nn.Module]) -> None:
        for m in modules:
            m.requires_grad_(False)
            m.eval()
            if all(m is not f for f in self._frozen):
                self._frozen.append(m)

    def train(self, mode: bool = True) -> SemHiTok:
        super().train(mode)
        for m in self._frozen:
            m.eval()  # frozen parts (and their EMA statistics) never update
        return self

    # ---------------------------------------------------------------- latents

    def teacher_features(self, images: Tensor) -> Tensor:
        """The teacher's features (B, L, D_teacher), no grad."""
        with torch.no_grad():
            return self.teacher.to(images.device).features(images)

    def semantic_target(self, images: Tensor) -> Tensor:
        """What the semantic decoder reconstructs: the teacher's features (B, L, D_teacher), or their whitened top
        principal components (B, L, target_dims) under `semantic.target: whitened`."""
        features = self.teacher_features(images)
        return features if self.target_whitener is None else self.target_whitener(features)

    @torch.no_grad()
    def fit_target_whitener(self, images: Tensor, batch_size: int = 64) -> None:
        """`semantic.target: whitened`: fit the whitener on the teacher's features of images (N, 3, H, W) (every
        patch of every image is one sample)."""
        if self.target_whitener is None:
            raise ValueError("semantic.target is raw: there is no whitener to fit")
        feats = [self.teacher_features(chunk) for chunk in images.split(batch_size)]
        self.target_whitener.fit(torch.cat(feats).flatten(0, 1))

    def semantic_latent(self, images: Tensor) -> Tensor:
        """images -> (B, L, d_sem), l2-normalised."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trainable(self.semantic_encoder)):
            return F.normalize(self.semantic_head(self.semantic_encoder(images)), dim=-1)

    def pixel_latent(self, images: Tensor) -> Tensor:
        """images -> (B, L, d_pix), l2-normalised."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trainable(self.pixel_encoder)):
            return F.normalize(self.pixel_encoder(images), dim=-1)

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """z_q (B, L, d_sem + d_pix) -> images (B, 3, H, W), unclamped."""
        z_sem, z_pix = z_q.split((self.config.semantic.d_sem, self.config.pixel.d_pix), dim=-1)
        z = torch.cat([self.semantic_proj(z_sem), z_pix], dim=-1)  # (B, L, c)
        g = self.config.grid
        return self.pixel_decoder(z.transpose(1, 2).reshape(z.shape[0], -1, g, g))  # decoder input (B, c, h, w)

    # ---------------------------------------------------------------- training forwards

    def semantic_forward(self, images: Tensor) -> dict[str, Tensor | QuantizerOutput]:
        """Stage 1: -> {"semantic_recon" (B, L, D_t), "semantic_target" (B, L, D_t), "quantizer": QuantizerOutput};
        D_t is the teacher's dimension, or semantic.target_dims under a whitened target."""
        self._check_images(images)
        if self.semantic_decoder is None:
            raise ValueError("this SemHiTok was loaded from an inference package without the stage-1 semantic "
                             "decoder: stage 1 needs the training run's checkpoint")
        target = self.semantic_target(images)
        q = self.semantic_quantizer(self.semantic_latent(images))
        return {"semantic_recon": self.semantic_decoder(q.z_q), "semantic_target": target, "quantizer": q}

    def pixel_forward(self, images: Tensor) -> dict[str, Tensor | QuantizerOutput]:
        """Stage 2: -> {"recon" (B, 3, H, W) unclamped, "quantizer": QuantizerOutput of the stage-2 codebook}.
        Also used for stage 2b (then only the enhance decoder is trainable). Training needs `freeze_semantic()`."""
        self._check_images(images)
        if self.training and _trainable(self.semantic_encoder):
            raise RuntimeError("stage 2 must not change the semantic branch: call model.freeze_semantic() first")
        q = self.quantizer(torch.cat([self.semantic_latent(images), self.pixel_latent(images)], dim=-1))
        return {"recon": self.decode_latent(q.z_q), "quantizer": q}

    # ---------------------------------------------------------------- public API

    def encode(self, images: Tensor) -> TokenGrid:
        """images (B, 3, H, W) in [-1, 1] -> TokenGrid (B, h, w); eval mode, no grad, no statistics updates."""
        self._check_images(images)
        with self._inference():
            z = torch.cat([self.semantic_latent(images), self.pixel_latent(images)], dim=-1)
            indices = self.quantizer(z).indices  # (B, L) in [0, K*m)
        g = self.config.grid
        return TokenGrid.from_flat(indices.view(-1, g, g), self.config.m)

    def decode(self, grid: TokenGrid) -> Tensor:
        """TokenGrid -> images (B, 3, H, W) in [-1, 1]."""
        with self._inference():
            z_q = self.quantizer.lookup(self._flat_indices(grid).flatten(1))  # (B, L, d_sem + d_pix)
            return self.decode_latent(z_q).clamp(-1.0, 1.0)

    def code_embeddings(self, grid: TokenGrid) -> tuple[Tensor, Tensor]:
        """TokenGrid -> (emb_sem (B, h, w, d_sem), emb_pix (B, h, w, d_pix)): the codebook vectors per patch."""
        with torch.no_grad():
            z = self.quantizer.lookup(self._flat_indices(grid))  # (B, h, w, d_sem + d_pix)
        emb_sem, emb_pix = z.split((self.config.semantic.d_sem, self.config.pixel.d_pix), dim=-1)
        return emb_sem, emb_pix

    def code_table(self) -> tuple[Tensor, Tensor]:
        """The code vectors of every flat index f in [0, K*m), in that order: (emb_sem (K*m, d_sem),
        emb_pix (K*m, d_pix)); row f is what `code_embeddings` gives a patch with code `TokenGrid.from_flat(f, m)`."""
        index = torch.arange(self.config.vocab_size, device=self.semantic_proj.weight.device)  # (K*m,)
        with torch.no_grad():
            z = self.quantizer.lookup(index)  # (K*m, d_sem + d_pix)
        emb_sem, emb_pix = z.split((self.config.semantic.d_sem, self.config.pixel.d_pix), dim=-1)
        return emb_sem, emb_pix

    # ---------------------------------------------------------------- checkpoints

    def save_pretrained(self, directory: str | os.PathLike, training_only: bool = True,
                        dtype: torch.dtype | None = None) -> None:
        """Write the folder `directory` = `config.json` + `model.safetensors`, atomically (built in a hidden
        sibling, then swapped in: a crash leaves the old or the new checkpoint, never a mix). Replaces the folder.
        `training_only=False` leaves out the TRAINING_ONLY parts (an inference package); `dtype` casts the
        floating-point tensors (they load back into a float32 model)."""
        omitted = set(self.omitted) | (set() if training_only else set(TRAINING_ONLY))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if k.split(".", 1)[0] not in omitted}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        metadata = {"format": "pt"} | ({OMITTED_KEY: ",".join(sorted(omitted))} if omitted else {})
        with atomic_folder(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata=metadata)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, teacher: Teacher | None = None) -> SemHiTok:
        """Strict load of a `save_pretrained` folder; clear errors for missing/corrupt files and any mismatch."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"SemHiTok checkpoint folder not found: {directory}")
        config = _read_config(directory / CONFIG_NAME)
        state, omitted = _read_weights(directory / WEIGHTS_NAME)
        model = cls(config, teacher=teacher, init_from_teacher=False)
        for name in omitted:
            setattr(model, name, None)
        _check_state(model.state_dict(), state, config, directory)
        model.load_state_dict(state, strict=True)
        return model

    # ---------------------------------------------------------------- input checks

    def _check_images(self, images: Tensor) -> None:
        S = self.config.image_size
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1:] != (3, S, S):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, {S}, {S}) in [-1, 1], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [-1, 1], got dtype {images.dtype}")

    def _flat_indices(self, grid: TokenGrid) -> Tensor:
        """Validated TokenGrid -> flat indices f (B, h, w) on the model's device."""
        g, K, m = self.config.grid, self.config.K, self.config.m
        if grid.shape[1:] != (g, g):
            raise ValueError(f"expected a TokenGrid of shape (B, {g}, {g}), got {grid.shape}")
        for name, value, n in (("semantic", grid.semantic, K), ("texture", grid.texture, m)):
            if value.numel() and (value.min() < 0 or value.max() >= n):
                raise ValueError(f"{name} indices must be in [0, {n}), got range [{int(value.min())}, {int(value.max())}]")
        return grid.to(self.semantic_proj.weight.device).flat(m)

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode + no grad for the block, then every submodule's previous mode is restored."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode


STAGE_FORWARDS: Mapping[str, Callable[[SemHiTok, Tensor], dict[str, Tensor | QuantizerOutput]]] = MappingProxyType({
    "1": SemHiTok.semantic_forward,
    "2": SemHiTok.pixel_forward,
    "2b": SemHiTok.pixel_forward,  # only the enhance decoder trains
})  # fmt: skip


class StageForward(nn.Module):
    """The training forward of one stage as a module's `forward`, so DDP (which syncs gradients only for calls
    through its wrapper) can wrap it: stage "1" runs `model.semantic_forward`, "2" / "2b" `model.pixel_forward`.
    Holds `model` and nothing else (its state dict is the model's under "model.")."""

    def __init__(self, model: SemHiTok, stage: str):
        super().__init__()
        self.model, self.stage, self._run = model, stage, _pick(STAGE_FORWARDS, "stage", stage)

    def forward(self, images: Tensor) -> dict[str, Tensor | QuantizerOutput]:
        return self._run(self.model, images)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def load_student_from_teacher(student: PatchViT, teacher_state: dict[str, Tensor]) -> None:
    """Copy the teacher's patch embedding, positions and first blocks into the student; shapes must agree."""
    own = student.state_dict()
    shared = {k: v for k, v in teacher_state.items() if k in own}
    bad = [f"{k}: student {tuple(own[k].shape)} vs teacher {tuple(v.shape)}" for k, v in shared.items()
           if own[k].shape != v.shape]
    if bad or not shared:
        raise ValueError("semantic.init_from_teacher: teacher and student shapes differ: " + "; ".join(bad or ["no shared keys"]))
    student.load_state_dict({**own, **shared}, strict=True)


def _read_config(path: Path) -> SemHiTokConfig:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {path}: not valid JSON ({err})") from None
    return SemHiTokConfig.from_dict(data)


def _read_weights(path: Path) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """-> (state, the TRAINING_ONLY parts the file leaves out)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # one read: the tensors and the metadata
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as err:  # safetensors raises several error types for truncated / garbage files
        raise ValueError(f"corrupt {path}: cannot read safetensors ({err})") from None
    omitted = tuple(name for name in metadata.get(OMITTED_KEY, "").split(",") if name)
    unknown = sorted(set(omitted) - set(TRAINING_ONLY))
    if unknown:
        raise ValueError(f"corrupt {path}: its metadata leaves out {unknown}, which are not training-only parts "
                         f"{list(TRAINING_ONLY)}")
    return state, omitted


def _check_state(expected: dict[str, Tensor], state: dict[str, Tensor], config: SemHiTokConfig, where: Path) -> None:
    """Name every missing / unexpected key and every shape mismatch between config and checkpoint."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {where} does not match its config.json (K={config.K}, m={config.m}, "
            f"quantizer={config.quantizer.kind}): missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {shapes}"
        )
