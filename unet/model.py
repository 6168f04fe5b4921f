"""The FedDiffuse paper's UNet: the "annotated diffusion" UNet (ConvNeXt blocks, linear attention).

Architecture as in docs/feddiffuse.md section 1 (the parameter counts there are the ground truth:
2,996,315 for dim 28 / 1 channel, 14,892,477 for dim 64 / 3 channels). The model predicts the noise
eps from (x_t, t); the diffusion process lives in `unet.diffusion`.

Top-level children are named by role, so that the encoder / bottleneck / decoder split used by the
federated methods is a plain module-name prefix lookup (`UNet.GROUP_PREFIXES`, see `unet.groups`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "SinusoidalEmbedding", "ConvNextBlock", "LinearAttention", "Attention"]


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of integer timesteps: [sin(t w_i), cos(t w_i)].

    Frequencies w_i = 10000^(-i / (half - 1)), i = 0..half-1, as in the annotated-diffusion code.
    An odd `dim` is zero-padded by one feature so the output always has `dim` features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"time embedding dim must be >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        # t: [B] (integer or float timesteps) -> [B, dim]
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)  # [half]
        args = t.float()[:, None] * freqs[None, :]  # [B, half]
        emb = torch.cat((args.sin(), args.cos()), dim=-1)  # [B, 2 half]
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class ConvNextBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) as used by the annotated-diffusion UNet.

    7x7 depthwise conv -> (+ time condition per channel) -> GroupNorm(1) -> 3x3 conv to mult*out -> GELU
    -> GroupNorm(1) -> 3x3 conv to out, plus a residual (1x1 conv when in != out).
    """

    def __init__(self, dim_in: int, dim_out: int, *, time_emb_dim: int | None = None, mult: int = 2) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_emb_dim, dim_in)) if time_emb_dim else None
        self.ds_conv = nn.Conv2d(dim_in, dim_in, 7, padding=3, groups=dim_in)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim_in),
            nn.Conv2d(dim_in, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Tensor | None = None) -> Tensor:
        # x: [B, in, H, W], time_emb: [B, time_dim] -> [B, out, H, W]
        h = self.ds_conv(x)  # [B, in, H, W]
        if self.mlp is not None and time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None]  # condition broadcast over H, W
        h = self.net(h)  # [B, out, H, W]
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2021; "efficient attention"): O(N) in the number of positions.

    q is softmaxed over the feature axis, k over positions; the output projection is followed by
    GroupNorm(1, c) as in the annotated-diffusion code.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, c, H, W] -> [B, c, H, W]
        b, _, h, w = x.shape
        # [B, 3 h d, H, W] -> three [B, h, d, N]
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale  # over features d
        k = k.softmax(dim=-1)  # over positions N
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # [B, h, d, e]
        out = torch.einsum("bhde,bhdn->bhen", context, q)  # [B, h, e, N]
        return self.to_out(out.reshape(b, -1, h, w))  # [B, h*e, H, W] -> [B, c, H, W]


class Attention(nn.Module):
    """Multi-head softmax self-attention over all H*W positions (used once, in the bottleneck)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, c, H, W] -> [B, c, H, W]
        b, _, h, w = x.shape
        # [B, h, d, N] -> [B, h, N, d]; SDPA's default scale is d^-1/2, as in the reference code.
        q, k, v = (z.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for z in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
        out = out.transpose(-1, -2).reshape(b, -1, h, w)  # [B, h*d, H, W]
        return self.to_out(out)


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(1, c)(x)): the `Residual(PreNorm(...))` wrapper of the reference code."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.norm(x))


class DownLevel(nn.Module):
    """One encoder level: ConvNeXt(in, out), ConvNeXt(out, out), linear attention, optional downsample."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, downsample: bool) -> None:
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_emb_dim=time_dim)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_emb_dim=time_dim)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out))
        # 4x4 stride-2 conv halves H and W (28 -> 14 -> 7); the last level keeps its resolution.
        self.downsample = nn.Conv2d(dim_out, dim_out, 4, 2, 1) if downsample else nn.Identity()

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, in, H, W] -> (skip [B, out, H, W], next [B, out, H/2, W/2] or [B, out, H, W])
        x = self.block1(x, t)
        x = self.block2(x, t)
        x = self.attn(x)
        return x, self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level: concat skip, ConvNeXt(2 out, in), ConvNeXt(in, in), linear attention, upsample."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.block1 = ConvNextBlock(dim_out * 2, dim_in, time_emb_dim=time_dim)
        self.block2 = ConvNextBlock(dim_in, dim_in, time_emb_dim=time_dim)
        self.attn = PreNormResidual(dim_in, LinearAttention(dim_in))
        self.upsample = nn.ConvTranspose2d(dim_in, dim_in, 4, 2, 1)  # doubles H and W

    def forward(self, x: Tensor, skip: Tensor, t: Tensor) -> Tensor:
        # x: [B, out, H, W], skip: [B, out, H, W] -> [B, in, 2H, 2W]
        x = torch.cat((x, skip), dim=1)  # [B, 2 out, H, W]
        x = self.block1(x, t)
        x = self.block2(x, t)
        x = self.attn(x)
        return self.upsample(x)


class UNet(nn.Module):
    """The paper's UNet (annotated diffusion). Predicts the noise: forward(x_t, t) -> eps_hat.

    Args:
        dim: base width; the paper uses the image size (28 for Fashion-MNIST, 64 for CelebA).
        channels: image channels (input and output).
        dim_mults: width multipliers per level; the resolution halves between levels (not after the last).
    """

    GROUP_PREFIXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "encoder": ("init_conv", "time_mlp", "downs"),
        "bottleneck": ("mid_block1", "mid_attn", "mid_block2"),
        "decoder": ("ups", "final_block", "final_conv"),
    }

    def __init__(self, dim: int, channels: int = 1, dim_mults: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        if len(dim_mults) < 2:
            raise ValueError(f"dim_mults needs at least two levels, got {dim_mults}")
        self.dim = dim
        self.channels = channels
        self.dim_mults = tuple(dim_mults)
        init_dim = dim // 3 * 2
        dims = [init_dim, *(dim * m for m in dim_mults)]
        levels = list(zip(dims[:-1], dims[1:], strict=True))  # (in, out) per level
        time_dim = dim * 4

        # --- encoder ---
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.downs = nn.ModuleList(
            DownLevel(d_in, d_out, time_dim, downsample=i < len(levels) - 1) for i, (d_in, d_out) in enumerate(levels)
        )
        # --- bottleneck ---
        mid = dims[-1]
        self.mid_block1 = ConvNextBlock(mid, mid, time_emb_dim=time_dim)
        self.mid_attn = PreNormResidual(mid, Attention(mid))
        self.mid_block2 = ConvNextBlock(mid, mid, time_emb_dim=time_dim)
        # --- decoder --- (the first level's skip is never used, as in the reference code)
        self.ups = nn.ModuleList(UpLevel(d_in, d_out, time_dim) for d_in, d_out in reversed(levels[1:]))
        self.final_block = ConvNextBlock(dim, dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # x: [B, C, H, W] (H, W divisible by 2^(levels-1)), t: [B] long -> eps_hat [B, C, H, W]
        x = self.init_conv(x)  # [B, init_dim, H, W]
        temb = self.time_mlp(t)  # [B, 4 dim]
        skips = []
        for level in self.downs:  # dim 28: [B,28,28,28] -> [B,56,14,14] -> [B,112,7,7]
            skip, x = level(x, temb)
            skips.append(skip)
        x = self.mid_block1(x, temb)  # [B, 4 dim, H/4, W/4] for three levels
        x = self.mid_attn(x)
        x = self.mid_block2(x, temb)
        for level in self.ups:  # [B,112,7,7] -> [B,56,14,14] -> [B,28,28,28]
            x = level(x, skips.pop(), temb)
        x = self.final_block(x)  # [B, dim, H, W]
        return self.final_conv(x)  # [B, C, H, W]
