"""Convolutional building blocks and 2D positional encoding."""
from __future__ import annotations

import math

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide `channels`."""
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))). (N, C, H, W) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvNormAct(nn.Sequential):
    """conv 3x3 -> GroupNorm -> GELU. (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            group_norm(out_channels),
            nn.GELU(),
        )


def sincos_position_encoding(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding of a grid in normalised coordinates. Returns (H * W, dim).

    Coordinates are pixel centres in [0, 1], so the encoding does not depend on the resolution.
    """
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1000.0) / max(quarter, 1)))
    freqs = freqs * (2 * math.pi)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    angles_y = grid_y.reshape(-1, 1) * freqs
    angles_x = grid_x.reshape(-1, 1) * freqs
    enc = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    if enc.shape[1] < dim:
        enc = torch.nn.functional.pad(enc, (0, dim - enc.shape[1]))
    return enc.to(dtype)
