"""Segmenting a volume along its three axes from one annotated volume (issue 18 item 2).

A slice-by-slice model sees no through-plane context: cut along one axis, it lights up look-alike
structures on slices far from the target. Cut along the other two axes, those same voxels sit in
slices that also show the target and its surroundings, and the model leaves them out. PlanePrompts
holds one prompt set per axis (each from slices of the prompt volume along that axis, through
volume_prompts); Segmenter.segment_volume averages the three slice-by-slice probability volumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALL_AXES = (0, 1, 2)


@dataclass
class PlanePrompts:
    """Prompt sets per slicing axis (axis -> EncodedPrompts), cut from the same prompt volume(s)."""

    per_axis: Mapping[int, Any]

    @property
    def axes(self) -> tuple[int, ...]:
        return tuple(sorted(self.per_axis))

    @property
    def shift(self) -> float:
        """No ensemble threshold shift: planes are not combined with --ensemble."""
        return 0.0

    @property
    def num_prompts(self) -> int:
        return min(p.num_prompts for p in self.per_axis.values())
