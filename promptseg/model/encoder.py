"""The shared image encoder: (image, prompt map, prompt type) -> features at strides 2, 4, 8, 16,
..."""

from __future__ import annotations

import torch
from torch import nn

from promptseg.model.config import ModelConfig
from promptseg.model.layers import ConvNormAct, ResidualBlock
from promptseg.model.query_corrections import CHANNELS as CORRECTION_CHANNELS


class SharedEncoder(nn.Module):
    """Encodes query images and prompt pairs with the same weights.

    images (N, C, R, R) in [0, 1], maps (N, R, R) in [0, 1] (zeros for queries), types (N,) long
    -> list of features, entry i of shape (N, widths[i], R / 2 ** (i + 1), R / 2 ** (i + 1)).

    With `ModelConfig.query_corrections`, `corrections` (N, 2, R, R) (promptseg.model.
    query_corrections) enter through a convolution of their own beside the stem, without bias and
    zero at initialisation: zero maps, or None, leave the features unchanged.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = config.widths
        self.stem = nn.Conv2d(config.in_channels + 1, widths[0], 3, stride=2, padding=1)
        self.type_embedding = nn.Embedding(config.num_prompt_types, widths[0])
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.correction_stem = None
        if config.query_corrections:
            self.correction_stem = nn.Conv2d(
                CORRECTION_CHANNELS, widths[0], 3, stride=2, padding=1, bias=False
            )
            nn.init.zeros_(self.correction_stem.weight)
        stages = []
        for index, width in enumerate(widths):
            layers: list[nn.Module] = (
                [] if index == 0 else [ConvNormAct(widths[index - 1], width, stride=2)]
            )
            layers += [ResidualBlock(width) for _ in range(config.blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        corrections: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        x = torch.cat([images * 2.0 - 1.0, maps.unsqueeze(1) * 2.0 - 1.0], dim=1)
        x = self.stem(x) + self.type_embedding(types)[:, :, None, None]
        if corrections is not None:
            if self.correction_stem is None:
                raise ValueError(
                    "this model was built without query_corrections and takes no correction maps"
                )
            x = x + self.correction_stem(corrections.to(x.dtype))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
