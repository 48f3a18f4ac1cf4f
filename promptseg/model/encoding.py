"""PromptEncoding: what the query side needs from encoded prompt sets, the unit the engine
caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEncoding:
    """Everything the query decoder needs from a batch of G prompt sets.

    keys[s][e], values[s][e]: (G, H, Nk_s, D) for attention stage s and entry e, where the entries
    are the stage's blocks followed, with label propagation, by the propagation pair
    (ModelConfig.encoding_entries);
    key_lengths[s]: (G,) long valid keys per group, or None when every group is full.
    """

    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    key_lengths: list[torch.Tensor | None]

    @property
    def groups(self) -> int:
        return self.keys[0][0].shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEncoding:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)

        return PromptEncoding(
            [[move(t) for t in stage] for stage in self.keys],
            [[move(t) for t in stage] for stage in self.values],
            [None if n is None else n.to(device) for n in self.key_lengths],
        )

    def nbytes(self) -> int:
        tensors = [t for stage in self.keys + self.values for t in stage]
        return sum(t.numel() * t.element_size() for t in tensors)
