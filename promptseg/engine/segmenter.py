"""Segmenter: the user-facing inference API (DESIGN.md section 5).

    seg = Segmenter.from_pretrained(device="cuda")
    prompts = seg.encode_prompts(images, masks)          # K pairs, encoded once
    probs = seg.segment(queries, prompts)                # (N, H, W) float32 in [0, 1]
    result = seg.segment_volume("scan.nii.gz", prompts, axis=2)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.io import ImageData, read_image, slice_volume, stack_slices
from promptseg.data.preprocess import prepare_image
from promptseg.engine.backends import PromptState, create_backend
from promptseg.engine.prompt_cache import PromptCache, content_key
from promptseg.engine.prompts_input import ArrayOrPath, Prompt, as_prompts, load_2d, prepare_prompt
from promptseg.errors import InputError
from promptseg.kernels import default_backend
from promptseg.model import PromptSegNet
from promptseg.train.checkpoint import load_model

DEFAULT_WEIGHTS = "promptseg_default.safetensors"


def packaged_weights_path() -> Path:
    """Path of the weights shipped inside the package."""
    return Path(str(resources.files("promptseg") / "weights" / DEFAULT_WEIGHTS))


@dataclass
class EncodedPrompts:
    """A prompt set encoded once and reusable for any number of queries."""

    encoding: PromptState  # a PromptEncoding for the PyTorch backends; backend-specific otherwise
    num_prompts: int
    key: str


@dataclass
class VolumeResult:
    """Probabilities of a volume in its own voxel grid, with the geometry to write it back.

    probabilities: (X, Y, Z) float32 in [0, 1]; mask: (X, Y, Z) bool (probabilities > 0.5).
    """

    probabilities: np.ndarray
    source: ImageData
    axis: int

    @property
    def mask(self) -> np.ndarray:
        return self.probabilities > 0.5

    @property
    def affine(self) -> np.ndarray | None:
        return self.source.affine


class Segmenter:
    """Runs a PromptSegNet on user images: preprocessing, prompt caching, batching, resizing back."""

    def __init__(
        self,
        model: PromptSegNet,
        device: str | torch.device | None = None,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
        max_batch: int = 16,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        """backend: one of ENGINE_BACKENDS (None: triton on CUDA when it works, else torch);
        backend_options go to the backend's constructor (e.g. model_dir for onnxruntime).
        Raises BackendUnavailable with a one-line reason when the backend cannot run here."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if max_batch < 1:
            raise InputError("--max-batch", f"must be at least 1, got {max_batch}")
        if backend is None:
            backend = "triton" if default_backend(self.device) == "triton" else "torch"
        self.model = model.eval()
        self.backend = create_backend(backend, model, self.device, **(backend_options or {}))
        self.max_batch = max_batch
        self.cache = PromptCache(cache_bytes)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def resolution(self) -> int:
        return self.model.config.resolution

    @property
    def channels(self) -> int:
        return self.model.config.in_channels

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> "Segmenter":
        """Load weights (safetensors with the model config in its metadata)."""
        return cls(load_model(path), **kwargs)

    @classmethod
    def from_pretrained(cls, **kwargs: Any) -> "Segmenter":
        """The weights shipped in the package; no network needed."""
        return cls.from_checkpoint(packaged_weights_path(), **kwargs)

    def encode_prompts(
        self,
        images: Sequence[ArrayOrPath] | np.ndarray | Sequence[Prompt],
        masks: Sequence[ArrayOrPath] | np.ndarray | None = None,
        label: int | None = None,
    ) -> EncodedPrompts:
        """Encode K prompts (1..max_prompts): images with masks, or a list of Prompt objects.

        images: K arrays (H, W[, C]) or paths, or a (K, H, W[, C]) array; masks likewise (label maps:
        `label` picks one value, else any non-zero value is foreground). Cached by content.
        """
        prompts = list(images) if masks is None and images is not None and all(isinstance(p, Prompt) for p in images) else as_prompts(images, masks)
        if not prompts:
            raise InputError(None, "no prompts given: at least one prompt image with a mask, click, box or scribble is needed")
        limit = self.model.config.max_prompts
        if len(prompts) > limit:
            raise InputError(None, f"too many prompts: {len(prompts)} given, at most {limit} are supported")
        prepared = [prepare_prompt(p, self.resolution, self.channels, label) for p in prompts]
        prompt_images = torch.stack([p[0] for p in prepared])[None]
        prompt_maps = torch.stack([p[1] for p in prepared])[None]
        prompt_types = torch.tensor([[p[2] for p in prepared]], dtype=torch.long)
        key = content_key(prompt_images, prompt_maps, prompt_types, extra=f"{self.backend.name}:{id(self.backend)}")
        state = self.cache.get_or_create(key, lambda: self.backend.encode(prompt_images, prompt_maps, prompt_types))
        return EncodedPrompts(state, len(prompts), key)

    def _logits(self, batch: torch.Tensor, prompts: EncodedPrompts) -> torch.Tensor:
        """(N, C, R, R) prepared queries -> (N, R, R) float32 logits, in chunks of max_batch."""
        outputs = []
        for start in range(0, batch.shape[0], self.max_batch):
            outputs.append(self.backend.decode(batch[start : start + self.max_batch], prompts.encoding))
        return torch.cat(outputs)

    @staticmethod
    def _to_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(N, R, R) logits -> (N, H, W) probabilities resized to the query's own size."""
        resized = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return torch.sigmoid(resized).numpy().astype(np.float32)

    def segment(self, queries: Sequence[ArrayOrPath] | np.ndarray, prompts: EncodedPrompts) -> np.ndarray | list[np.ndarray]:
        """Segment 2D queries: a (N, H, W[, C]) array or a list of arrays/paths.

        Returns (N, H, W) float32 probabilities when all queries share one size, else a list of (H, W).
        """
        items = [load_2d(q, is_label=False, what=f"query {n}") for n, q in enumerate(queries)]
        if not items:
            raise InputError(None, "no query images given")
        prepared = torch.stack([prepare_image(a, self.resolution, self.channels, source=s) for a, s in items])
        logits = self._logits(prepared, prompts)  # all queries decoded together, max_batch at a time
        results = [self._to_probabilities(l[None], array.shape[:2])[0] for l, (array, _) in zip(logits, items)]
        if len({r.shape for r in results}) == 1:
            return np.stack(results)
        return results

    def iter_volume_batches(self, slices: np.ndarray, source: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(S, H, W) slices -> (start index, (n, C, R, R) prepared batch), max_batch slices at a time."""
        for start in range(0, slices.shape[0], self.max_batch):
            chunk = slices[start : start + self.max_batch]
            yield start, torch.stack([prepare_image(s, self.resolution, self.channels, source=source) for s in chunk])

    def segment_volume(self, volume: ArrayOrPath | ImageData, prompts: EncodedPrompts, axis: int = 2) -> VolumeResult:
        """Segment a 3D volume slice by slice along `axis`, streaming max_batch slices at a time.

        volume: a NIfTI path, an ImageData, or an (X, Y, Z) array. The result keeps the input's grid.
        """
        data = volume if isinstance(volume, ImageData) else (
            read_image(volume) if isinstance(volume, (str, os.PathLike)) else ImageData(np.asarray(volume), True, None, None, "volume")
        )
        array = data.array
        if array.ndim != 3 or (not data.is_volume and array.shape[-1] in (3, 4)):
            raise InputError(data.path, f"expected a 3D volume, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise InputError(data.path, "volume contains non-finite intensities (NaN or Inf)")
        slices = slice_volume(array, axis)
        out = np.empty(slices.shape, dtype=np.float32)
        for start, batch in self.iter_volume_batches(slices, data.path):
            logits = self._logits(batch, prompts)
            out[start : start + batch.shape[0]] = self._to_probabilities(logits, slices.shape[1:])
        return VolumeResult(stack_slices(out, axis), data, axis)
