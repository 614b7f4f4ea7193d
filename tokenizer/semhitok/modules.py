"""Neural building blocks: one pre-norm ViT block (used by the tiny teacher, the students, the semantic decoder and
the ViT pixel encoder), the VQGAN-style CNN encoder/decoder, and the PatchGAN discriminator.

ViT parameter names follow timm (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `patch_embed`,
`pos_embed`) so pretrained SigLIP blocks map onto them directly. The CNN follows taming-transformers' VQGAN with
attention in the middle blocks only (as LlamaGen's VQ), GroupNorm with up to 32 groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hs)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Learned positions + `depth` blocks + final norm over a fixed-length token sequence."""

    def __init__(self, num_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def hidden_states(self, x: Tensor) -> list[Tensor]:
        """[input + positions, after block 1, ..., after block depth] (HF convention; no final norm)."""
        states = [x + self.pos_embed]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.hidden_states(x)[-1])


class ConvReLU(nn.Sequential):
    """Conv2d (with bias) + ReLU: one of Inception-v3's conv + batch-norm + ReLU units with the norm folded in."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.relu = nn.ReLU()


class InceptionStem(nn.Module):
    """Inception-v3's stem (conv 3x3/2, conv 3x3, conv 3x3, max-pool/2, conv 1x1, conv 3x3, max-pool/2: stride 8,
    192 channels) with "same" padding so that it tiles the image like a patch embedding, then a stride-2 3x3 conv per
    further factor of 2 up to `patch_size` and a 1x1 projection to `width`: images (B, 3, H, W) in [-1, 1] ->
    (B, width, H / patch, W / patch). Its unit names match `InceptionTeacher.student_init_state` (the teacher's
    pretrained filters, batch norm folded into the bias), which is what lets a student start from the teacher's
    low-level features: trained from scratch, the small-data student does not learn object shape (docs/tokenizer.md)."""

    STRIDE = 8
    UNITS = (("conv", 3, 32, 3, 2), ("conv_1", 32, 32, 3, 1), ("conv_2", 32, 64, 3, 1), ("pool0", 0, 0, 3, 2),
             ("conv_3", 64, 80, 1, 1), ("conv_4", 80, 192, 3, 1), ("pool1", 0, 0, 3, 2))  # fmt: skip

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        if patch_size < self.STRIDE or patch_size & (patch_size - 1):
            raise ValueError(f"an Inception stem needs a power-of-2 patch size >= {self.STRIDE}, got {patch_size}")
        for name, c_in, c_out, k, stride in self.UNITS:
            unit = nn.MaxPool2d(k, stride, padding=k // 2) if name.startswith("pool") else ConvReLU(c_in, c_out, k, stride)
            self.add_module(name, unit)
        self.down = nn.Sequential(*(ConvReLU(192, 192, 3, 2) for _ in range(patch_size.bit_length() - 4)))
        self.proj = nn.Conv2d(192, width, 1)

    def forward(self, images: Tensor) -> Tensor:
        x = images * (255.0 / 256.0) - 1.0 / 256.0  # [-1, 1] -> Inception's (255 * (x + 1) / 2 - 128) / 128
        for name, *_ in self.UNITS:
            x = getattr(self, name)(x)
        return self.proj(self.down(x))


STEMS = ("patch", "inception")


class PatchViT(Transformer):
    """Images (B, 3, H, W) -> patch tokens (B, L, D) with L = (H / patch)**2; no class token.
    `stem`: "patch" (a linear patch embedding) or "inception" (`InceptionStem`)."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 stem: str = "patch"):  # fmt: skip
        super().__init__((image_size // patch_size) ** 2, width, depth, heads, mlp_ratio)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem == "inception":
            self.patch_embed: nn.Module = InceptionStem(patch_size, width)
        else:
            self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)

    def hidden_states(self, images: Tensor) -> list[Tensor]:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        return super().hidden_states(tokens)


class FeatureWhitener(nn.Module):
    """PCA whitening of teacher features: (..., D) -> (..., k), the top-k principal components of the features it was
    fitted on, each divided by its standard deviation. Buffers (saved with the model): mean (D), basis (D, k),
    scale (k), fitted."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, k))
        self.register_buffer("scale", torch.ones(k))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """features (N, D), N > k: principal axes of their covariance (float64 eigh: deterministic), largest first."""
        k = self.basis.shape[1]
        if features.shape[0] <= k:
            raise ValueError(f"fitting {k} principal components needs more than {k} feature vectors, got {features.shape[0]}")
        x = features.double()
        mean = x.mean(0)
        values, vectors = torch.linalg.eigh(torch.cov((x - mean).T))  # ascending
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        vectors = vectors * torch.where(vectors.sum(0) < 0, -1.0, 1.0).to(vectors)  # a fixed sign per axis
        self.mean.copy_(mean), self.basis.copy_(vectors), self.scale.copy_(values.clamp_min(1e-12).sqrt())
        self.fitted.fill_(True)

    def forward(self, features: Tensor) -> Tensor:
        if not self.fitted:
            raise RuntimeError("the teacher-feature whitener is not fitted (semantic.target: whitened): call fit first")
        return ((features.float() - self.mean) @ self.basis) / self.scale


class TokenDecoder(nn.Module):
    """Codes (B, L, d_in) -> Linear -> transformer -> Linear -> (B, L, d_out); the semantic decoder."""

    def __init__(self, num_tokens: int, d_in: int, width: int, depth: int, heads: int, d_out: int):
        super().__init__()
        self.proj_in = nn.Linear(d_in, width)
        self.transformer = Transformer(num_tokens, width, depth, heads)
        self.proj_out = nn.Linear(width, d_out)

    def forward(self, z: Tensor) -> Tensor:
        return self.proj_out(self.transformer(self.proj_in(z)))


# ----------------------------------------------------------------------------------------------- VQGAN-style CNN


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (B, H*W, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C)
        return x + self.proj(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels))


def head(channels: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, c_out, 3, padding=1))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H / 2**(len(ch_mult)-1), ...)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        chans = [ch * m for m in (1, *ch_mult)]
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1)]
        for level, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers += [ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_res_blocks)]
            if level < len(ch_mult) - 1:
                layers.append(Downsample(c_out))
        layers += [mid_block(chans[-1]), head(chans[-1], z_channels)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * 2**(len(ch_mult)-1), ...); unbounded output (clamp when decoding)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        chans = [ch * m for m in reversed(ch_mult)]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, chans[0], 3, padding=1), mid_block(chans[0])]
        for level, (c_in, c_out) in enumerate(zip([chans[0], *chans[:-1]], chans, strict=True)):
            layers += [ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_res_blocks + 1)]
            if level < len(ch_mult) - 1:
                layers.append(Upsample(c_out))
        self.layers = nn.Sequential(*layers, group_norm(chans[-1]), nn.SiLU())
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.layers(z))


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): images (B, 3, H, W) -> patch logits (B, 1, H', W')."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = ch
        for n in range(1, n_layers + 1):
            c_out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c_in, c_out, 4, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
