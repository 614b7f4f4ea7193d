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


class PatchViT(Transformer):
    """Images (B, 3, H, W) -> patch tokens (B, L, D) with L = (H / patch)**2; no class token."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__((image_size // patch_size) ** 2, width, depth, heads, mlp_ratio)
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)

    def hidden_states(self, images: Tensor) -> list[Tensor]:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        return super().hidden_states(tokens)


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
