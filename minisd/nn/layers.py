"""Building blocks shared by the VAE, the U-Net and the ControlNet.

Legend: B batch, C channels, H,W height and width, D time-embedding width.

Attribute names are those of diffusers' checkpoints (`norm1`, `conv1`, `time_emb_proj`, ...), so
their state dicts load with no key map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

    emb_i(t) = [cos(t·ω_i), sin(t·ω_i)],  ω_i = max_period^(−i / (dim/2 − freq_shift)),  i < dim/2

    (`flip_sin_to_cos=False` puts sin first, as in the original DDPM code.) t: (B,) -> (B, dim), fp32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    omega = torch.exp(exponent / (half - freq_shift))
    angles = t[:, None].float() * omega[None, :]  # (B, dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoidal embedding into the U-Net's time vector: Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, plus the projected time vector, twice; with a skip connection.

    h = conv1(silu(norm1(x))) + W_t·silu(emb)      (the time vector is added per channel)
    out = shortcut(x) + conv2(silu(norm2(h)))       (shortcut: identity, or 1×1 conv if C changes)

    The VAE uses the same block without a time vector (`time_dim=None`).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels) if time_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Halves H and W with a stride-2 3×3 conv.

    The U-Net pads 1 on every side; the VAE encoder (`padding=0`) pads only right and bottom, as the
    original LDM code did, so the two give different pixels — keep each as it was trained.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Doubles H and W (nearest neighbour), then a 3×3 conv; `size` forces the output size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some backends
            x = x.float()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))
