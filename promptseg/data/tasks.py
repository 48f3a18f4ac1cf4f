"""In-memory segmentation tasks: one target structure (dataset + label value) and its examples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ArrayTask:
    """A task whose examples are already at the model resolution.

    images: (N, C, R, R) uint8 (0..255) or float32 in [0, 1]; masks: (N, R, R) bool.
    `group` is the dataset the task comes from (so held-out splits remove whole datasets);
    `case_ids` (N,) names the case of each example (slices of one volume share it);
    `query_examples` (N,) bool, when given, marks the examples an evaluation may query, the others
    serving as prompts only (fit measured on unseen cases, prompted from the training cases).
    """

    name: str
    group: str
    images: np.ndarray
    masks: np.ndarray
    case_ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    query_examples: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.case_ids is None:
            self.case_ids = np.arange(len(self.images))
        if len(self.images) != len(self.masks):
            raise ValueError(
                f"task {self.name}: {len(self.images)} images but {len(self.masks)} masks"
            )
        if self.query_examples is not None and len(self.query_examples) != len(self.images):
            raise ValueError(
                f"task {self.name}: {len(self.query_examples)} query flags for {len(self.images)} "
                "examples"
            )

    def __len__(self) -> int:
        return len(self.images)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, R, R) float32 in [0, 1] and (R, R) bool for example `index`."""
        image = self.images[index]
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        return image.astype(np.float32, copy=False), self.masks[index].astype(bool, copy=False)

    def nonempty(self) -> np.ndarray:
        """Indices of examples whose mask has at least one foreground pixel."""
        return np.flatnonzero(self.masks.reshape(len(self.masks), -1).any(axis=1))
