"""Ho et al. (2020) DDPM UNet in the configuration of diffusers' `UNet2DModel` for google/ddpm-cifar10-32.

Defaults reproduce that checkpoint's architecture (35,746,307 parameters at 32x32x3): widths 128/256/256/256,
two ResNet blocks per level, single-head self-attention at 16x16, dropout 0.1, GroupNorm(32, eps 1e-6),
SiLU, sinusoidal time embedding (flip_sin_to_cos=False, freq_shift=1) -> Linear -> SiLU -> Linear.
Shapes and parameter counts match diffusers; module names do not (diffusers is not a dependency).

Top-level children are named by role (as in diffusers): `time_embedding`, `conv_in`, `down_blocks`,
`mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`; `GROUP_PREFIXES` maps them onto the
encoder / bottleneck / decoder split used by the federated methods.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DDPMUNet"]

_GROUPS = 32
_EPS = 1e-6


def timestep_embedding(t: Tensor, dim: int, freq_shift: float = 1.0, max_period: float = 10000.0) -> Tensor:
    """diffusers' `get_timestep_embedding` with flip_sin_to_cos=False: [sin(t w_i), cos(t w_i)].

    w_i = max_period^(-i / (half - freq_shift)), i = 0..half-1. t: [B] -> [B, dim].
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))  # [half]
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat((args.sin(), args.cos()), dim=-1)  # [B, 2 half]
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """Sinusoidal(base) -> Linear(base, 4 base) -> SiLU -> Linear(4 base, 4 base)."""

    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.linear_1 = nn.Linear(base, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        # t: [B] -> [B, dim]
        return self.linear_2(F.silu(self.linear_1(timestep_embedding(t, self.base))))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default", output_scale_factor=1)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_GROUPS, c_in, eps=_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(_GROUPS, c_out, eps=_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        # x: [B, c_in, H, W], temb: [B, temb_dim] -> [B, c_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))  # [B, c_out, H, W]
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over H*W positions with a residual (diffusers' Attention, heads=1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(_GROUPS, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, c, H, W] -> [B, c, H, W]
        b, c, h, w = x.shape
        z = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, N, c]
        # One head of size c: SDPA scales by c^-1/2. [B, 1, N, c]
        q, k, v = (proj(z).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, N, c]
        out = self.to_out(out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    """3x3 stride-2 conv without padding after a (0, 1, 0, 1) zero pad (diffusers, downsample_padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # [B, c, H, W] -> [B, c, H/2, W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # [B, c, H, W] -> [B, c, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """`layers` ResNet blocks (each optionally followed by attention), then an optional downsample.

    Returns the output and every intermediate state, which the decoder consumes as skips.
    """

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, layers: int, attn: bool, downsample: bool, dropout: float
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(c_in if i == 0 else c_out, c_out, temb_dim, dropout) for i in range(layers)
        )
        self.attentions = nn.ModuleList(SelfAttention(c_out) for _ in range(layers)) if attn else None
        self.downsampler = Downsample(c_out) if downsample else None

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        # x: [B, c_in, H, W] -> ([B, c_out, H', W'], skips: `layers` (+1) tensors)
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)  # [B, c_out, H/2, W/2]
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers` ResNet blocks fed [x, skip] (each optionally followed by attention), then optional upsampling.

    Channel bookkeeping follows diffusers' UpBlock2D: block i takes `prev` (i = 0) or `c_out` channels
    plus a skip of `c_out` channels, except the last, whose skip has `c_skip_last` channels.
    """

    def __init__(
        self,
        c_prev: int,
        c_out: int,
        c_skip_last: int,
        temb_dim: int,
        layers: int,
        attn: bool,
        upsample: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (c_prev if i == 0 else c_out) + (c_skip_last if i == layers - 1 else c_out),
                c_out,
                temb_dim,
                dropout,
            )
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(SelfAttention(c_out) for _ in range(layers)) if attn else None
        self.upsampler = Upsample(c_out) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        # x: [B, c_prev, H, W]; pops len(resnets) skips from the end -> [B, c_out, 2H, 2W] or [B, c_out, H, W]
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat((x, skips.pop()), dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsampler is not None:
            x = self.upsampler(x)
        return x


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, temb_dim: int, dropout: float) -> None:
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, temb_dim, dropout)
        self.attention = SelfAttention(channels)
        self.resnet2 = ResnetBlock(channels, channels, temb_dim, dropout)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.resnet2(self.attention(self.resnet1(x, temb)), temb)


class DDPMUNet(nn.Module):
    """Ho et al. (2020) UNet; predicts the noise: forward(x_t, t) -> eps_hat.

    Args:
        image_size: H = W of the input; must be divisible by 2^(len(channel_mults) - 1).
        in_channels: image channels (input and output).
        base_channels: width of the first level; the time embedding has 4x this width.
        channel_mults: width multipliers per level; resolution halves between levels.
        layers_per_block: ResNet blocks per encoder level (the decoder has one more per level).
        attn_resolutions: resolutions (in pixels) at which levels get self-attention.
        dropout: dropout inside every ResNet block.
    """

    GROUP_PREFIXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "encoder": ("time_embedding", "conv_in", "down_blocks"),
        "bottleneck": ("mid_block",),
        "decoder": ("up_blocks", "conv_norm_out", "conv_out"),
    }

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: tuple[int, ...] = (1, 2, 2, 2),
        layers_per_block: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        n_levels = len(channel_mults)
        if image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{n_levels - 1} for {n_levels} levels")
        self.image_size = image_size
        self.in_channels = in_channels
        widths = [base_channels * m for m in channel_mults]
        res = [image_size // 2**i for i in range(n_levels)]  # resolution of each level
        temb_dim = 4 * base_channels

        # --- encoder ---
        self.time_embedding = TimeEmbedding(base_channels, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c_prev = widths[0]
        for i, c in enumerate(widths):
            self.down_blocks.append(
                DownBlock(
                    c_prev,
                    c,
                    temb_dim,
                    layers_per_block,
                    attn=res[i] in attn_resolutions,
                    downsample=i < n_levels - 1,
                    dropout=dropout,
                )
            )
            c_prev = c
        # --- bottleneck ---
        self.mid_block = MidBlock(widths[-1], temb_dim, dropout)
        # --- decoder ---
        self.up_blocks = nn.ModuleList()
        rev = widths[::-1]
        for j, c in enumerate(rev):
            self.up_blocks.append(
                UpBlock(
                    c_prev=rev[max(j - 1, 0)],
                    c_out=c,
                    # the last resnet's skip is the input of the mirrored encoder level: the previous
                    # level's downsampled output (width rev[j + 1]), or conv_in's output for j = last.
                    c_skip_last=rev[min(j + 1, n_levels - 1)],
                    temb_dim=temb_dim,
                    layers=layers_per_block + 1,
                    attn=res[n_levels - 1 - j] in attn_resolutions,
                    upsample=j < n_levels - 1,
                    dropout=dropout,
                )
            )
        self.conv_norm_out = nn.GroupNorm(_GROUPS, widths[0], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # x: [B, C, S, S], t: [B] long -> eps_hat [B, C, S, S]
        temb = self.time_embedding(t)  # [B, 4 base]
        x = self.conv_in(x)  # [B, base, S, S]
        skips = [x]
        for block in self.down_blocks:  # default: 32 -> 16 -> 8 -> 4 pixels, 128/256/256/256 channels
            x, block_skips = block(x, temb)
            skips.extend(block_skips)
        x = self.mid_block(x, temb)  # [B, 256, 4, 4] by default
        for block in self.up_blocks:  # 4 -> 8 -> 16 -> 32 pixels, 256/256/256/128 channels
            x = block(x, skips, temb)
        x = F.silu(self.conv_norm_out(x))  # [B, base, S, S]
        return self.conv_out(x)  # [B, C, S, S]
