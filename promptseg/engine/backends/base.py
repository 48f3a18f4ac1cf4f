"""The interface every inference backend implements.

A backend turns prepared prompts into a reusable prompt state once, then decodes any number of
query batches against it. The Segmenter does preprocessing, caching, batching and resizing, so a
backend only runs the two graphs:

    encode(images (1, K, C, R, R), maps (1, K, R, R), types (1, K) int64) -> state (has .nbytes())
    decode(queries (B, C, R, R), state) -> logits (B, R, R) float32 on the CPU

Inputs arrive as float32 / int64 CPU tensors; the backend moves them where it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from promptseg.model import PromptSegNet


class PromptState(Protocol):
    """What a backend keeps for one encoded prompt set; the prompt cache bounds it by nbytes()."""

    def nbytes(self) -> int: ...


@dataclass
class FlatPromptState:
    """A prompt encoding as the flat tensors of promptseg.export.graphs.encoding_names (any array
    type)."""

    tensors: tuple[Any, ...]

    def nbytes(self) -> int:
        """Bytes held by the tensors (torch tensors and numpy arrays both report .nbytes)."""
        return sum(t.nbytes for t in self.tensors)


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why in one line."""


class InferenceBackend(ABC):
    """Runs a PromptSegNet's prompt encoder and query decoder on one device."""

    name: str = ""
    export_dir_option: str | None = (
        None  # constructor keyword taking a `promptseg export` folder, if any
    )
    max_batch: int | None = (
        None  # the largest query batch decode() accepts (a TensorRT profile's); None: any
    )

    def __init__(self, model: PromptSegNet, device: torch.device) -> None:
        self.model = model
        self.config = model.config
        self.device = device

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        """(True, "") when the backend can run on `device`, else (False, one-line reason)."""
        return True, ""

    @abstractmethod
    def encode(self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> PromptState:
        """(1, K, C, R, R), (1, K, R, R), (1, K) -> the prompt state decode() consumes."""

    @abstractmethod
    def decode(self, queries: torch.Tensor, state: PromptState) -> torch.Tensor:
        """(B, C, R, R) float32 -> (B, R, R) float32 CPU logits."""

    def decodes_corrections(self) -> bool:
        """Whether `decode_corrected` runs: a PyTorch backend of a query-corrections model
        (promptseg.model.query_corrections); the exported graphs take no corrections."""
        return False

    def decode_corrected(
        self, queries: torch.Tensor, state: PromptState, corrections: torch.Tensor
    ) -> torch.Tensor:
        """`decode` with corrections (B, 2, R, R) on the queries; only where
        `decodes_corrections`."""
        raise NotImplementedError(f"the {self.name} backend decodes no query corrections")

    def select_prompts(
        self, state: PromptState, keep: Sequence[int], num_prompts: int
    ) -> PromptState | None:
        """The state of the prompts `keep` (indices into the `num_prompts` encoded) cut from
        `state`, or None when this backend cannot (then the subset is encoded on its own)."""
        return None

    def decode_members(self, queries: torch.Tensor, states: Sequence[PromptState]) -> torch.Tensor:
        """The same queries (B, C, R, R) against each of M states -> (M, B, R, R) float32 CPU
        logits."""
        return torch.stack([self.decode(queries, state) for state in states])

    def decodes_means(self) -> bool:
        """Whether decode_mean works here (else the ensemble averages the members'
        probabilities)."""
        return False

    def decode_mean(
        self, queries: torch.Tensor, states: Sequence[PromptState]
    ) -> torch.Tensor | None:
        """The same queries (B, C, R, R) decoded once from the mean of their M members' attended
        features -> (B, R, R) float32 CPU logits, or None where this backend cannot
        (`decodes_means`)."""
        return None

    def decode_each(self, queries: torch.Tensor, states: Sequence[PromptState]) -> torch.Tensor:
        """Query m (of M, (M, C, R, R)) against state m -> (M, R, R) float32 CPU logits."""
        return torch.cat([self.decode(query[None], state) for query, state in zip(queries, states)])
