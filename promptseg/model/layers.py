"""Building blocks of the convolutional model: residual and upsampling blocks, prompt tokenizer, 2D
positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide `channels`."""
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))). (N, C, H, W) ->
    same."""

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


def sincos_position_encoding(
    height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding of a grid in normalised coordinates. Returns (H * W, dim).

    Coordinates are pixel centres in [0, 1], so the encoding does not depend on the resolution.
    """
    quarter = dim // 4
    freqs = torch.exp(
        torch.arange(quarter, device=device, dtype=torch.float32)
        * (-math.log(1000.0) / max(quarter, 1))
    )
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


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, fuse: (N, C_in, h, w) + (N, C_skip, 2h, 2w) -> (N, C_out,
    2h, 2w)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fuse = ConvNormAct(in_channels + skip_channels, out_channels)
        self.refine = ResidualBlock(out_channels)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """extra (N, C_out, 2h, 2w), optional: added to the fusing convolution's output before its
        normalisation."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        if extra is None:
            return self.refine(self.fuse(torch.cat([x, skip], dim=1)))
        conv, *rest = self.fuse
        fused = conv(torch.cat([x, skip], dim=1)) + extra
        for layer in rest:
            fused = layer(fused)
        return self.refine(fused)


class PromptTokenizer(nn.Module):
    """Turns encoder features of prompt pairs into prompt tokens at one attention stage.

    key_features (G*K, C, h, w) come from the image alone (as a query would be encoded), so keys
    compare like with like; value_features (G*K, C, h, w) come from image + prompt map, and the
    map pooled to the stage grid is embedded into the values explicitly; pos (h*w, C) is the
    stage's positional encoding, added to the keys.
    Returns keys, values (G, K*h*w, C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.key_norm = nn.LayerNorm(dim)
        self.value_norm = nn.LayerNorm(dim)
        self.map_embedding = nn.Linear(1, dim)

    def forward(
        self,
        key_features: torch.Tensor,
        value_features: torch.Tensor,
        maps: torch.Tensor,
        pos: torch.Tensor,
        groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = key_features.shape
        pooled = F.adaptive_avg_pool2d(maps.unsqueeze(1).to(value_features.dtype), (h, w))
        keys = self.key_norm(key_features.flatten(2).transpose(1, 2)) + pos
        values = self.value_norm(value_features.flatten(2).transpose(1, 2))
        values = values + self.map_embedding(pooled.flatten(2).transpose(1, 2) * 2.0 - 1.0)
        return keys.reshape(groups, -1, c), values.reshape(groups, -1, c)
