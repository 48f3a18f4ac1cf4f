"""Segmenter: the user-facing inference API (docs/design.md section 5).

seg = Segmenter.from_pretrained(device="cuda")
prompts = seg.encode_prompts(images, masks)          # K pairs, encoded once
probs = seg.segment(queries, prompts)                # (N, H, W) float32 in [0, 1]; one size
maps = seg.segment_each(queries, prompts)            # any sizes: N arrays (H_n, W_n)
result = seg.segment_volume("scan.nii.gz", prompts, axis=2)
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.data.io import (
    ImageData,
    canonical_view,
    check_image_array,
    read_image,
    slice_volume,
)
from promptseg.data.preprocess import all_finite, prepare_image
from promptseg.engine.adaptation import Adaptation, adapt_to_prompts
from promptseg.engine.backends import InferenceBackend, PromptState, create_backend
from promptseg.engine.corrections import (
    DEFAULT_SETTINGS,
    CorrectionSettings,
    refine_probabilities,
    voxel_spacing,
)
from promptseg.engine.ensemble import (
    MAX_ENSEMBLE,
    Ensemble,
    build_ensemble,
    decision_threshold,
    flipped,
    mean_logits,
    mean_probabilities,
    member_probabilities,
    plan_members,
)
from promptseg.engine.model_corrections import combined, correction_input, mark_arrays
from promptseg.engine.planes import PlanePrompts
from promptseg.engine.prompt_cache import PromptCache, content_key
from promptseg.engine.prompts_input import (
    ArrayOrPath,
    Prompt,
    as_prompts,
    check_not_grayscale,
    load_2d,
    prepare_prompt,
)
from promptseg.engine.slice_context import consistent_slices
from promptseg.engine.volume_prompts import (
    empty_masks_expected,
    read_volumes,
    volume_prompts,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.kernels import default_kernel
from promptseg.model import PromptSegNet
from promptseg.model.weights import load_model, packaged_weights_path

ADAPTABLE_BACKENDS = (
    "torch",
    "triton",
    "compile",
    "reference",
)  # backends that run a PyTorch model copy


@dataclass
class EncodedPrompts:
    """A prompt set encoded once and reusable for any number of queries.

    encoding: the prompt set as given; ensemble: the members' states and calibration shift when the
    Segmenter ensembles (promptseg.engine.ensemble), else None; backend: the backend of a model
    adapted to these prompts (test-time adaptation), None for the Segmenter's own.
    """

    encoding: PromptState  # a PromptEncoding for the PyTorch backends; backend-specific otherwise
    num_prompts: int
    key: str
    ensemble: Ensemble | None = None
    backend: InferenceBackend | None = None
    owner: object = None  # the token of the Segmenter that encoded them (they fit its model only)

    @property
    def shift(self) -> float:
        """The ensemble's leave-one-out logit shift of the mask threshold (0.0 without one)."""
        return self.ensemble.shift if self.ensemble is not None else 0.0

    def mask_threshold(self, threshold: float = 0.5) -> float:
        """The probability above which `Segmenter.segment`'s output is foreground for these prompts:
        `threshold` moved by the ensemble's shift (promptseg.engine.ensemble.decision_threshold)."""
        return decision_threshold(threshold, self.shift)


@dataclass
class AdaptedModel:
    """A backend on a copy of the model adapted to one prompt set, held in the prompt cache."""

    backend: InferenceBackend
    parameter_bytes: int

    def nbytes(self) -> int:
        return self.parameter_bytes


def binary_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy in bits, -p log2 p - (1 - p) log2 (1 - p), of probabilities in [0, 1]:
    0 where the model is sure, 1 at p = 0.5. Same shape, float32."""
    p = np.clip(probabilities.astype(np.float32), 1e-7, 1.0 - 1e-7)
    return (-(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))).astype(np.float32)


@dataclass
class VolumeResult:
    """Probabilities of a volume in its own voxel grid, with the geometry to write it back.

    probabilities: (X, Y, Z) float32 in [0, 1]; mask: (X, Y, Z) bool (probabilities above 0.5
    moved by `shift`, an ensemble's leave-one-out logit shift: decision_threshold(0.5, shift));
    variance: (X, Y, Z) float32 variance of the ensemble members' probabilities (None without an
    ensemble); candidates: (N, X, Y, Z) float32 probabilities of the first N ensemble members
    (None unless the Segmenter was asked for candidates).
    """

    probabilities: np.ndarray
    source: ImageData
    axis: int
    variance: np.ndarray | None = None
    candidates: np.ndarray | None = None
    shift: float = 0.0

    @property
    def mask(self) -> np.ndarray:
        return self.probabilities > decision_threshold(0.5, self.shift)

    @property
    def uncertainty(self) -> np.ndarray:
        """(X, Y, Z) float32 predictive entropy in bits (`binary_entropy` of the probabilities)."""
        return binary_entropy(self.probabilities)

    @property
    def affine(self) -> np.ndarray | None:
        return self.source.affine


@dataclass
class QueryMaps:
    """What the Segmenter computes for queries in their own grid: probabilities (*S) float32,
    the ensemble members' variance (*S) (None without an ensemble) and candidates (C, *S), the
    first C members' probabilities (None unless asked for)."""

    probabilities: np.ndarray
    variance: np.ndarray | None
    candidates: np.ndarray | None


@dataclass
class LabelResult:
    """Several labels of one query, each segmented with its own prompts.

    labels: the L label values; probabilities: (L, *spatial) float32 in [0, 1], in `labels` order;
    variance: (L, *spatial) float32 variance of the ensemble members' probabilities (None without
    an ensemble); candidates: (N, L, *spatial) float32 probabilities of the first N ensemble members
    (None unless the Segmenter was asked for candidates); shifts: each label's ensemble logit shift
    of the threshold (empty: none), so label l is foreground where logit(p_l) + shift_l exceeds
    logit(threshold).
    """

    labels: tuple[int, ...]
    probabilities: np.ndarray
    threshold: float = 0.5
    variance: np.ndarray | None = None
    candidates: np.ndarray | None = None
    shifts: tuple[float, ...] = ()

    def scores(self) -> np.ndarray:
        """(L, *spatial) what is compared with the threshold: the probabilities themselves, or with
        shifts their logits plus each label's shift (then against logit(threshold))."""
        if not any(self.shifts):
            return self.probabilities
        p = np.clip(self.probabilities.astype(np.float64), 1e-7, 1.0 - 1e-7)
        shifts = np.asarray(self.shifts, np.float64).reshape((-1,) + (1,) * (p.ndim - 1))
        return np.log(p) - np.log1p(-p) + shifts

    def _cut(self) -> float:
        return (
            float(np.log(self.threshold / (1.0 - self.threshold)))
            if any(self.shifts)
            else self.threshold
        )

    @property
    def masks(self) -> np.ndarray:
        """(L, *spatial) bool: each label on its own above its (shifted) threshold."""
        return self.scores() > self._cut()

    @property
    def uncertainty(self) -> np.ndarray:
        """(L, *spatial) float32 predictive entropy in bits (`binary_entropy` of the
        probabilities)."""
        return binary_entropy(self.probabilities)

    @property
    def label_map(self) -> np.ndarray:
        """(*spatial) integer map: at each pixel the most probable label above the threshold, else
        0."""
        scores = self.scores()
        best = scores.argmax(axis=0)
        values = np.asarray(self.labels)[best]
        dtype = np.uint8 if max(self.labels) < 256 else np.int32
        return np.where(scores.max(axis=0) > self._cut(), values, 0).astype(dtype)


class Segmenter:
    """Runs a PromptSegNet on user images: preprocessing, prompt caching, batching, resizing
    back."""

    def __init__(
        self,
        model: PromptSegNet,
        device: str | torch.device | None = None,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
        max_batch: int = 16,
        cache_bytes: int = 512 * 2**20,
        ensemble: int = 1,
        adaptation: Adaptation | None = None,
        candidates: int = 0,
        ensemble_shift: bool = True,
        member_maps: bool = False,
    ) -> None:
        """backend: one of ENGINE_BACKENDS (None: triton on CUDA when it works, else torch);
        backend_options go to the backend's constructor (e.g. model_dir for onnxruntime).
        max_batch: queries per decode call, lowered (with a warning) to the backend's own limit
        when it has one (a TensorRT engine's max_batch).
        ensemble: average the prediction over this many members (1..MAX_ENSEMBLE): drop-one prompt
        subsets and flips of prompts and queries, calibrated on the prompts they leave out
        (promptseg.engine.ensemble; fewer members when the prompt set has fewer). Each flip of a
        prompt set is encoded once and cached with the members. adaptation: adapt a copy of the
        model to every prompt set before use (promptseg.engine.adaptation; PyTorch backends only;
        cached with the prompt set, so a volume adapts once). candidates: also return the
        probabilities of the first `candidates` members (0..ensemble; results' `candidates`).
        ensemble_shift: move the mask threshold by the ensemble's leave-one-out logit shift (the
        probabilities stay the members' unshifted mean); False keeps it at the threshold asked for.
        member_maps: also decode every ensemble member on its own, for the results' `variance`
        (always with candidates); without it an ensemble decodes each flip once, from its members'
        mean features, and `variance` is None.
        Raises BackendUnavailable with a one-line reason when the backend cannot run here."""
        if not 1 <= ensemble <= MAX_ENSEMBLE:
            raise InputError("--ensemble", f"must lie in 1..{MAX_ENSEMBLE}, got {ensemble}")
        if candidates and ensemble < 2:
            raise InputError(
                "--candidates", "needs --ensemble N with N >= 2: candidates are ensemble members"
            )
        if not 0 <= candidates <= ensemble:
            raise InputError(
                "--candidates",
                f"must lie in 0..{ensemble} (the --ensemble members), got {candidates}",
            )
        self.device = checked_device(device)
        self.token = object()  # marks the prompts this Segmenter encodes
        if max_batch < 1:
            raise InputError("--max-batch", f"must be at least 1, got {max_batch}")
        if backend is None:
            backend = "triton" if default_kernel(self.device) == "triton" else "torch"
        self.model = model  # the backends run copies of their own; adaptation copies it too
        self.backend_options = dict(backend_options or {})
        self.backend = create_backend(backend, model, self.device, **self.backend_options)
        if (
            adaptation is not None
            and adaptation.steps > 0
            and self.backend.name not in ADAPTABLE_BACKENDS
        ):
            raise InputError(
                "--adapt",
                f"needs a PyTorch backend ({', '.join(ADAPTABLE_BACKENDS)}), not "
                f"{self.backend.name}",
            )
        self.ensemble = ensemble
        self.ensemble_shift = ensemble_shift
        self.member_maps = member_maps or candidates > 0
        self.candidates = candidates
        self.adaptation = adaptation if adaptation is not None and adaptation.steps > 0 else None
        limit = self.backend.max_batch
        if limit is not None and max_batch > limit:
            warnings.warn(
                f"max_batch {max_batch} exceeds the {self.backend.name} backend's limit of {limit} "
                "queries; "
                f"using {limit}",
                stacklevel=2,
            )
            max_batch = limit
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
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> Segmenter:
        """Load weights (safetensors with the model config in its metadata)."""
        return cls(load_model(path), **kwargs)

    @classmethod
    def from_pretrained(cls, **kwargs: Any) -> Segmenter:
        """The weights shipped in the package; no network needed."""
        return cls.from_checkpoint(packaged_weights_path(), **kwargs)

    def encode_prompts(
        self,
        images: Sequence[ArrayOrPath] | np.ndarray | Sequence[Prompt],
        masks: Sequence[ArrayOrPath] | np.ndarray | None = None,
        label: int | None = None,
    ) -> EncodedPrompts:
        """Encode K prompts (1..max_prompts): images with masks, or a list of Prompt objects.

        images: K arrays (H, W[, C]) or paths, or a (K, H, W[, C]) array; masks likewise (label
        maps: `label` picks one value, else any non-zero value is foreground). Cached by content.
        """
        prompts = (
            list(images)
            if masks is None and images is not None and all(isinstance(p, Prompt) for p in images)
            else as_prompts(images, masks)
        )
        if not prompts:
            raise InputError(
                None,
                "no prompts given: at least one prompt image with a mask, click, box or scribble "
                "is needed",
            )
        limit = self.model.config.max_prompts
        if len(prompts) > limit:
            raise InputError(
                None, f"too many prompts: {len(prompts)} given, at most {limit} are supported"
            )
        prepared = [prepare_prompt(p, self.resolution, self.channels, label) for p in prompts]
        prompt_images = torch.stack([p[0] for p in prepared])[None]
        prompt_maps = torch.stack([p[1] for p in prepared])[None]
        prompt_types = torch.tensor([[p[2] for p in prepared]], dtype=torch.long)
        key = content_key(prompt_images, prompt_maps, prompt_types, extra=self.backend.name)
        backend = None
        if self.adaptation is not None:
            adapted_key = f"{key}:adapted:{self.adaptation}"
            backend = self.cache.get_or_create(
                adapted_key,
                lambda: self._adapted(prompt_images[0], prompt_maps[0], prompt_types[0]),
            ).backend
            key = f"{adapted_key}:encoding"
        run = backend or self.backend

        def encode(flip: tuple[int, ...], keep: tuple[int, ...]) -> PromptState:
            """The prompts `keep` flipped by `flip`, encoded once (cached)."""
            index = list(keep)
            images, maps = (
                flipped(prompt_images[:, index], flip),
                flipped(prompt_maps[:, index], flip),
            )
            everything = len(keep) == len(prompts)
            member_key = (
                key + (f":flip{flip}" if flip else "") + ("" if everything else f":keep{keep}")
            )
            return self.cache.get_or_create(
                member_key, lambda: self._encode(images, maps, prompt_types[:, index], run)
            )

        ensemble = None
        if self.ensemble > 1:
            members = plan_members(len(prompts), self.ensemble)
            ensemble = self.cache.get_or_create(
                f"{key}:ensemble{self.ensemble}" + ("" if self.ensemble_shift else ":noshift"),
                lambda: build_ensemble(
                    run,
                    prompt_images,
                    prompt_maps,
                    prompt_types,
                    members,
                    encode,
                    self.ensemble_shift,
                ),
            )
        return EncodedPrompts(
            encode((), tuple(range(len(prompts)))), len(prompts), key, ensemble, backend, self.token
        )

    def encode_volume_prompts(
        self,
        image: Any,
        labels: Any,
        label: int | None = None,
        slices: int = 8,
        axis: int | Sequence[int] = 2,
        empty: int | None = None,
    ) -> EncodedPrompts | PlanePrompts:
        """Encode K = `slices` slices of an annotated volume (or of each of several, given as
        equal-length lists) as mask prompts of `label` (None: any non-zero value).

        image: a NIfTI path, DICOM series folder, ImageData or (X, Y, Z) array; labels: its label
        volume. Slices are cut along `axis` of the closest RAS orientation, as segment_volume cuts
        queries; `empty` of them (default K // 4) lie just outside the labelled extent
        (promptseg.engine.volume_prompts). Several axes, e.g. (0, 1, 2), give PlanePrompts: a prompt
        set per axis, for segment_volume to segment along each and average."""
        if not isinstance(axis, int):
            image, labels = read_volumes(image, labels)  # read once for every axis
            return PlanePrompts(
                {
                    plane: self.encode_volume_prompts(image, labels, label, slices, plane, empty)
                    for plane in axis
                }
            )
        with empty_masks_expected():
            return self.encode_prompts(volume_prompts(image, labels, label, slices, axis, empty))

    def _adapted(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> AdaptedModel:
        """A backend (same kind and options) on a copy of the model adapted to one prompt set."""
        model = adapt_to_prompts(self.model, images, maps, types, self.adaptation)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        return AdaptedModel(
            create_backend(self.backend.name, model, self.device, **self.backend_options), size
        )

    def _encode(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        backend: InferenceBackend,
    ) -> PromptState:
        """backend.encode; after an out-of-memory error the prompt cache (whose encodings hold
        device memory) is emptied and the encoding retried once, then PromptSegError (one line).

        The K prompts are encoded in one call: the prompt encoder may mix them (a prompt
        bottleneck), so they cannot be split into smaller chunks.
        """
        for attempt in range(2):
            try:
                return backend.encode(images, maps, types)
            except torch.OutOfMemoryError:
                # handled below, after the exception (and the frames holding its tensors) is gone
                pass
            if attempt == 0:
                self.cache.clear()
                self._release_cached_memory()
        raise PromptSegError(
            f"{self.device}: out of memory encoding {images.shape[1]} prompts with the "
            f"{self.backend.name} backend, "
            "even with the prompt cache emptied; use fewer prompts"
        )

    def _predict(
        self, batch: torch.Tensor, prompts: EncodedPrompts, corrections: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C, R, R) prepared queries -> (N, R, R) float32 logits (an ensemble's: the logit of
        `mean_probabilities`) and, for an ensemble with member_maps, the members' (unshifted)
        probabilities (M, N, R, R) (else None). corrections (N, 2, R, R): the queries' own clicks
        and scribbles (`corrects_with_model` only, no ensemble). InputError for prompts another
        Segmenter encoded."""
        if prompts.owner is not self.token:
            raise InputError(
                "prompts",
                "were encoded by another Segmenter (another model or backend); "
                "encode them with this Segmenter's encode_prompts",
            )
        backend = prompts.backend or self.backend
        if corrections is not None:
            return self._decode_corrected(batch, prompts, backend, corrections), None
        if prompts.ensemble is None:
            return self._decode(
                batch, lambda chunk: backend.decode(chunk, prompts.encoding), backend.name, 1
            ), None
        members = len(prompts.ensemble.members)

        def decode_members(view: torch.Tensor, states: list[PromptState]) -> torch.Tensor:
            return self._decode(
                view, lambda chunk: backend.decode_members(chunk, states), backend.name, len(states)
            )

        def decode_mean(view: torch.Tensor, states: list[PromptState]) -> torch.Tensor | None:
            if not backend.decodes_means():
                return None
            return self._decode(
                view, lambda chunk: backend.decode_mean(chunk, states), backend.name, len(states)
            )

        mean = mean_logits(
            mean_probabilities(prompts.ensemble, batch, decode_mean, decode_members)[None]
        )
        if not self.member_maps or members == 1:
            return mean, None
        return mean, member_probabilities(prompts.ensemble, batch, decode_members)

    def _decode_corrected(
        self,
        batch: torch.Tensor,
        prompts: EncodedPrompts,
        backend: InferenceBackend,
        corrections: torch.Tensor,
    ) -> torch.Tensor:
        """(N, C, R, R) prepared queries with their corrections (N, 2, R, R) -> (N, R, R) logits;
        InputError unless `corrects_with_model` and the prompts are no ensemble."""
        if not self.corrects_with_model:
            raise InputError(
                "prompts",
                f"this model ({'with' if self.model.config.query_corrections else 'without'} "
                f"query corrections) on the {backend.name} backend does not read corrections; "
                "refine without prompts for a local edit",
            )
        if prompts.ensemble is not None:
            raise InputError("--ensemble", "corrections read by the model need --ensemble 1")
        channels = batch.shape[1]
        return self._decode(
            torch.cat([batch, corrections.to(batch.dtype)], dim=1),
            lambda chunk: backend.decode_corrected(
                chunk[:, :channels], prompts.encoding, chunk[:, channels:]
            ),
            backend.name,
            1,
        )

    @property
    def corrects_with_model(self) -> bool:
        """Whether `refine(..., prompts=...)` segments again with the corrections as model input:
        a query-corrections model (promptseg.model.query_corrections) on a PyTorch backend."""
        return self.backend.decodes_corrections()

    def _decode(
        self,
        batch: torch.Tensor,
        call: Callable[[torch.Tensor], torch.Tensor],
        backend_name: str,
        width: int,
    ) -> torch.Tensor:
        """(N, C, R, R) prepared queries -> call(chunk) logits (..., n, R, R) joined along the query
        axis, in chunks of max_batch // width queries (each query costs `width` decodes).

        On an out-of-memory error a chunk is halved and retried, and max_batch stays at the size
        that worked, so later chunks do not fail again. The cached memory is released only after
        the except block, once the error and the failed call's tensors it references are gone.
        """
        outputs = []
        start = 0
        while start < batch.shape[0]:
            chunk = batch[start : start + max(1, self.max_batch // width)]
            try:
                logits = call(chunk)
            except torch.OutOfMemoryError:
                # handled below: past the except block the error no longer holds the call's frames
                logits = None
            if logits is None:
                if chunk.shape[0] == 1:
                    raise PromptSegError(
                        f"{self.device}: out of memory decoding a single query with the "
                        f"{backend_name} backend"
                    )
                self.max_batch = max(1, chunk.shape[0] * width // 2)
                self._release_cached_memory()
                continue
            outputs.append(logits)
            start += chunk.shape[0]
        return torch.cat(outputs, dim=-3)

    def _release_cached_memory(self) -> None:
        """Collect unreachable tensors, then give the CUDA caching allocator's free blocks back
        before a retry."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    @staticmethod
    def _to_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """(N, R, R) logits -> (N, H, W) probabilities resized to the query's own size."""
        resized = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[
            :, 0
        ]
        return torch.sigmoid(resized).numpy().astype(np.float32)

    def _resized(
        self, logits: torch.Tensor, members: torch.Tensor | None, size: tuple[int, int]
    ) -> QueryMaps:
        """`_predict`'s logits (N, R, R) and member probabilities (M, N, R, R) or None -> QueryMaps
        at the query size (H, W): the members' variance resized bilinearly, each candidate through
        its logits."""
        probabilities = self._to_probabilities(logits, size)
        if members is None:
            return QueryMaps(probabilities, None, None)
        variance = members.var(dim=0, unbiased=False)[:, None]
        variance = F.interpolate(variance, size=size, mode="bilinear", align_corners=False)[
            :, 0
        ].clamp_min(0.0)
        count = min(self.candidates, members.shape[0])
        candidates = (
            np.stack(
                [
                    self._to_probabilities(mean_logits(members[i : i + 1]), size)
                    for i in range(count)
                ]
            )
            if count
            else None
        )
        return QueryMaps(probabilities, variance.numpy().astype(np.float32), candidates)

    def segment(
        self, queries: Sequence[ArrayOrPath] | np.ndarray, prompts: EncodedPrompts
    ) -> np.ndarray:
        """Segment 2D queries of one size: a (N, H, W[, C]) array or a list of arrays/paths.

        Returns (N, H, W) float32 probabilities in [0, 1], always an array: queries of different
        sizes are an InputError naming the first that differs (segment_each takes any sizes); the
        mask is the probabilities above `prompts.mask_threshold()` (0.5 unless an ensemble shifts
        it).
        """
        prepared, sizes = self._prepare_queries(queries)
        for n, size in enumerate(sizes):
            if size != sizes[0]:
                raise InputError(
                    f"query {n}",
                    f"size {size[1]}x{size[0]} differs from query 0's {sizes[0][1]}x"
                    f"{sizes[0][0]}; segment() returns one (N, H, W) array, use segment_each()",
                )
        return np.stack([maps.probabilities for maps in self._query_maps(prepared, sizes, prompts)])

    def segment_each(
        self, queries: Sequence[ArrayOrPath] | np.ndarray, prompts: EncodedPrompts
    ) -> list[np.ndarray]:
        """Segment 2D queries of any sizes: a list of N (H_n, W_n) float32 probability maps, one
        per query at its own size (the same values as segment() gives for queries of one size)."""
        prepared, sizes = self._prepare_queries(queries)
        return [maps.probabilities for maps in self._query_maps(prepared, sizes, prompts)]

    def _prepare_queries(
        self, queries: Sequence[ArrayOrPath] | np.ndarray
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Read and prepare 2D queries once: (N, C, R, R) tensor and each query's own (H, W)."""
        items = [load_2d(q, is_label=False, what=f"query {n}") for n, q in enumerate(queries)]
        if not items:
            raise InputError(None, "no query images given")
        prepared = torch.stack(
            [prepare_image(a, self.resolution, self.channels, source=s) for a, s in items]
        )
        return prepared, [array.shape[:2] for array, _ in items]

    def _query_maps(
        self, prepared: torch.Tensor, sizes: Sequence[tuple[int, int]], prompts: EncodedPrompts
    ) -> list[QueryMaps]:
        """(N, C, R, R) prepared queries -> N QueryMaps of one query each (probabilities (H, W)),
        decoded max_batch at a time."""
        logits, members = self._predict(prepared, prompts)
        maps = [
            self._resized(
                logits[n : n + 1], None if members is None else members[:, n : n + 1], size
            )
            for n, size in enumerate(sizes)
        ]
        return [
            QueryMaps(
                m.probabilities[0],
                None if m.variance is None else m.variance[0],
                None if m.candidates is None else m.candidates[:, 0],
            )
            for m in maps
        ]

    def iter_volume_batches(
        self, slices: np.ndarray, source: str
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(S, H, W) slices -> (start index, (n, C, R, R) prepared batch), max_batch slices at a
        time."""
        for start in range(0, slices.shape[0], self.max_batch):
            chunk = slices[start : start + self.max_batch]
            yield (
                start,
                torch.stack(
                    [prepare_image(s, self.resolution, self.channels, source=source) for s in chunk]
                ),
            )

    def segment_volume(
        self,
        volume: ArrayOrPath | ImageData,
        prompts: EncodedPrompts | PlanePrompts,
        axis: int = 2,
        consistency: bool = False,
    ) -> VolumeResult:
        """Segment a 3D volume slice by slice along `axis`, streaming max_batch slices at a time.

        volume: a NIfTI path, an ImageData, or an (X, Y, Z) array. The result keeps the input's
        grid. With an affine, `axis` and the slices' in-plane orientation are those of the volume's
        closest RAS orientation (io.canonical_view), so the storage order (LPS, RAS, ...) does not
        matter. consistency: make the slices agree through the plane
        (promptseg.engine.slice_context), along `axis`. PlanePrompts (encode_volume_prompts with
        several axes): the mean of the volume segmented along each of their axes
        (promptseg.engine.planes).
        """
        data = as_volume(volume)
        maps = self._plane_maps(data, [prompts], axis)
        if consistency:
            make_consistent(maps.probabilities, data, axis)
        return VolumeResult(
            maps.probabilities[0],
            data,
            axis,
            None if maps.variance is None else maps.variance[0],
            None if maps.candidates is None else maps.candidates[:, 0],
            prompts.shift,
        )

    def _plane_maps(
        self, data: ImageData, prompt_sets: Sequence[EncodedPrompts | PlanePrompts], axis: int
    ) -> QueryMaps:
        """_volume_maps; for PlanePrompts (promptseg.engine.planes) the mean of the probabilities
        segmented along each of their axes (no ensemble variance or candidates)."""
        planes = [isinstance(p, PlanePrompts) for p in prompt_sets]
        if not any(planes):
            return self._volume_maps(data, prompt_sets, axis)  # type: ignore[arg-type]
        axes = prompt_sets[0].axes if planes[0] else ()  # type: ignore[union-attr]
        if not all(planes) or any(p.axes != axes for p in prompt_sets):  # type: ignore[union-attr]
            raise InputError(
                "prompts", "mix plane prompts of other axes, or plane and single-axis prompts"
            )
        total = None
        for plane in axes:
            sets = [p.per_axis[plane] for p in prompt_sets]  # type: ignore[union-attr]
            maps = self._volume_maps(data, sets, plane)
            total = maps.probabilities if total is None else total + maps.probabilities
        return QueryMaps(total / len(axes), None, None)

    def _volume_maps(
        self, data: ImageData, prompt_sets: Sequence[EncodedPrompts], axis: int
    ) -> QueryMaps:
        """(X, Y, Z) volume -> QueryMaps of L = len(prompt_sets): probabilities (L, X, Y, Z)
        float32, with an ensemble the variance (L, X, Y, Z) and candidates (C, L, X, Y, Z) when
        asked for.

        Peak memory beyond the outputs is one batch of prepared slices and its logits, whatever the
        depth.
        """
        array = data.array
        if (
            array.ndim != 3 or not data.is_volume
        ):  # the rule of promptseg.data.volumes, as in the CLI
            raise InputError(data.path, f"expected a 3D volume, got shape {array.shape}")
        if not all_finite(array):
            raise InputError(data.path, "volume contains non-finite intensities (NaN or Inf)")
        slices = slice_volume(
            canonical_view(array, data.affine), axis
        )  # RAS axes: any storage order alike
        shape = (len(prompt_sets),) + array.shape
        ensembles = [p.ensemble for p in prompt_sets]
        several = self.member_maps and all(e is not None and len(e.members) > 1 for e in ensembles)
        count = min(self.candidates, *(len(e.members) for e in ensembles)) if several else 0
        out = QueryMaps(
            np.empty(shape, np.float32),
            np.empty(shape, np.float32) if several else None,
            np.empty((count,) + shape, np.float32) if count else None,
        )
        # views: batches land in place, no whole-volume copy
        views = [slice_volume(canonical_view(o, data.affine), axis) for o in out.probabilities]
        variance_views = (
            [slice_volume(canonical_view(o, data.affine), axis) for o in out.variance]
            if out.variance is not None
            else []
        )
        candidate_views = (
            [
                [slice_volume(canonical_view(o, data.affine), axis) for o in c]
                for c in out.candidates
            ]
            if out.candidates is not None
            else []
        )
        for start, batch in self.iter_volume_batches(slices, data.path):
            stop = start + batch.shape[0]
            for index, prompts in enumerate(prompt_sets):
                logits, members = self._predict(batch, prompts)
                maps = self._resized(logits, members if several else None, slices.shape[1:])
                views[index][start:stop] = maps.probabilities
                if maps.variance is not None:
                    variance_views[index][start:stop] = maps.variance
                for candidate in range(count):
                    candidate_views[candidate][index][start:stop] = maps.candidates[candidate]
        return out

    def refine(
        self,
        result: VolumeResult | np.ndarray,
        clicks: Sequence[tuple] = (),
        scribbles: Sequence[tuple[np.ndarray, bool]] = (),
        image: ArrayOrPath | None = None,
        settings: CorrectionSettings = DEFAULT_SETTINGS,
        prompts: EncodedPrompts | None = None,
        local_edit: bool = True,
    ) -> VolumeResult | np.ndarray:
        """Correct a result with clicks and scribbles on the query itself: a VolumeResult (clicks
        (x, y, z, positive) on voxel array[x, y, z] of its grid) or (H, W) probabilities of a 2D
        query (clicks (x, y, positive), x the column; pass the query `image`). scribbles: (mask of
        the strokes, positive) on the same grid. The prompts' cache is kept either way.

        Without prompts, the corrections edit the probabilities locally
        (promptseg.engine.corrections; settings: how far they reach, chosen on training
        datasets). With the EncodedPrompts the result came from (`corrects_with_model` only), the
        model also segments the query again with the corrections as input (a volume's slices that
        hold one) and, with `local_edit`, the two combine (model_corrections.combined); without
        it the model's output is the result. Pass the uncorrected result and every correction made
        so far: the model reads them together."""
        if isinstance(result, VolumeResult):
            original, source = result.probabilities, result.source
            corrected = (
                None
                if prompts is None
                else self._corrected_volume(result, prompts, clicks, scribbles)
            )
            spacing = voxel_spacing(source.affine)

            def edit() -> np.ndarray:
                return refine_probabilities(
                    original, source.array, clicks, scribbles, spacing, settings
                )

            probabilities = self._joined(original, corrected, edit, local_edit)
            return VolumeResult(
                probabilities, result.source, result.axis, result.variance, result.candidates
            )
        original = np.asarray(result)
        query = None if image is None else load_2d(image, is_label=False, what="query")[0]
        corrected = None
        if prompts is not None:
            if query is None:
                raise InputError("image", "refining a 2D result with the model needs its query")
            if query.shape[:2] != original.shape:
                raise InputError(
                    "image",
                    f"query of shape {query.shape[:2]} differs from the result's {original.shape}",
                )
            marks = mark_arrays(original.shape, clicks, scribbles)
            prepared = prepare_image(query, self.resolution, self.channels, source="query")
            logits, _ = self._predict(
                prepared[None], prompts, correction_input(*marks, self.resolution)[None]
            )
            corrected = self._to_probabilities(logits, original.shape)[0]
        return self._joined(
            original,
            corrected,
            lambda: refine_probabilities(original, query, clicks, scribbles, settings=settings),
            local_edit,
        )

    @staticmethod
    def _joined(
        original: np.ndarray,
        corrected: np.ndarray | None,
        edit: Callable[[], np.ndarray],
        local_edit: bool,
    ) -> np.ndarray:
        """The refined probabilities: the local edit alone without the model's pass (`corrected`
        None), the model's output alone without `local_edit`, else the two combined."""
        if corrected is None:
            return edit()
        if not local_edit:
            return corrected
        return combined(original, edit(), corrected)

    def _corrected_volume(
        self,
        result: VolumeResult,
        prompts: EncodedPrompts,
        clicks: Sequence[tuple],
        scribbles: Sequence[tuple[np.ndarray, bool]],
    ) -> np.ndarray:
        """(X, Y, Z) probabilities of `result` with the slices (along result.axis, in the closest
        RAS view it was segmented in) that hold a correction segmented again with them."""
        if isinstance(prompts, PlanePrompts):
            raise InputError(
                "prompts",
                "corrections read by the model take the prompts of one axis, not --planes",
            )
        data = result.source
        marks = [
            slice_volume(canonical_view(m, data.affine), result.axis)
            for m in mark_arrays(data.array.shape, clicks, scribbles)
        ]
        probabilities = np.array(result.probabilities, dtype=np.float32, copy=True)
        views = slice_volume(canonical_view(probabilities, data.affine), result.axis)
        slices = slice_volume(canonical_view(data.array, data.affine), result.axis)
        for index in np.flatnonzero(marks[0].any(axis=(1, 2)) | marks[1].any(axis=(1, 2))):
            prepared = prepare_image(
                slices[index], self.resolution, self.channels, source=data.path
            )
            corrections = correction_input(marks[0][index], marks[1][index], self.resolution)
            logits, _ = self._predict(prepared[None], prompts, corrections[None])
            views[index] = self._to_probabilities(logits, slices.shape[1:])[0]
        return probabilities

    def encode_labels(
        self,
        images: Sequence[ArrayOrPath] | np.ndarray,
        label_maps: Sequence[ArrayOrPath] | np.ndarray,
        labels: Sequence[int] | None = None,
    ) -> dict[int, EncodedPrompts]:
        """Encode one prompt set per label from K prompt images and their (H, W) label maps.

        labels: the label values to segment (default: every non-zero value in the label maps). A
        prompt whose map lacks a label counts as an example without that structure; each label must
        appear in at least one map.
        """
        loaded_images = [
            load_2d(image, is_label=False, what=f"prompt {n}") for n, image in enumerate(images)
        ]
        loaded_maps = [
            load_2d(m, is_label=True, what=f"prompt {n} label map")
            for n, m in enumerate(label_maps)
        ]
        if len(loaded_images) != len(loaded_maps):
            raise InputError(
                None, f"{len(loaded_images)} prompt images but {len(loaded_maps)} label maps"
            )
        if labels is None:  # every non-zero value is a label: not of a grayscale image
            for label_map, source in loaded_maps:
                check_not_grayscale(label_map, source)
        present = sorted({int(v) for m, _ in loaded_maps for v in np.unique(m) if v != 0})
        chosen = present if labels is None else [int(label) for label in labels]
        if not chosen:
            raise InputError(
                loaded_maps[0][1] if loaded_maps else None,
                "the label maps contain no foreground label",
            )
        for label in chosen:
            if label not in present:
                raise InputError(
                    None,
                    f"label {label} appears in none of the prompt label maps (labels present: "
                    f"{present})",
                )
        return {
            label: self.encode_prompts(
                [
                    Prompt(image=a, kind="mask", mask=(m == label).astype(np.uint8), name=src)
                    for (a, src), (m, _) in zip(loaded_images, loaded_maps)
                ]
            )
            for label in chosen
        }

    def segment_labels(
        self,
        queries: Sequence[ArrayOrPath] | np.ndarray,
        prompts: Mapping[int, EncodedPrompts],
        threshold: float = 0.5,
    ) -> list[LabelResult]:
        """Segment several labels of 2D queries, each label with its own prompts: one LabelResult
        per query."""
        check_threshold(threshold)
        if not prompts:
            raise InputError(None, "no labels to segment")
        prepared, sizes = self._prepare_queries(queries)  # read and prepared once for every label
        per_label = [self._query_maps(prepared, sizes, p) for p in prompts.values()]
        labels = tuple(prompts)
        results = []
        for n in range(len(sizes)):
            maps = [label_maps[n] for label_maps in per_label]
            variance = (
                np.stack([m.variance for m in maps])
                if all(m.variance is not None for m in maps)
                else None
            )
            candidates = None
            if all(m.candidates is not None for m in maps):
                count = min(len(m.candidates) for m in maps)
                candidates = np.stack([m.candidates[:count] for m in maps], axis=1)
            results.append(
                LabelResult(
                    labels,
                    np.stack([m.probabilities for m in maps]),
                    threshold,
                    variance,
                    candidates,
                    label_shifts(prompts),
                )
            )
        return results

    def segment_volume_labels(
        self,
        volume: ArrayOrPath | ImageData,
        prompts: Mapping[int, EncodedPrompts],
        axis: int = 2,
        threshold: float = 0.5,
        consistency: bool = False,
    ) -> LabelResult:
        """Segment several labels of a 3D volume in one streamed pass; probabilities (L, X, Y, Z).
        consistency: as for segment_volume, each label apart."""
        check_threshold(threshold)
        if not prompts:
            raise InputError(None, "no labels to segment")
        data = as_volume(volume)
        maps = self._plane_maps(data, list(prompts.values()), axis)
        if consistency:
            make_consistent(maps.probabilities, data, axis)
        return LabelResult(
            tuple(prompts),
            maps.probabilities,
            threshold,
            maps.variance,
            maps.candidates,
            label_shifts(prompts),
        )


def label_shifts(prompts: Mapping[int, EncodedPrompts]) -> tuple[float, ...]:
    """Each label's ensemble shift, in the mapping's order; () when none shifts."""
    shifts = tuple(p.shift for p in prompts.values())
    return shifts if any(shifts) else ()


def make_consistent(probabilities: np.ndarray, data: ImageData, axis: int) -> None:
    """Apply slice_context.consistent_slices in place to each (X, Y, Z) map of (L, X, Y, Z)
    probabilities, through the slices along `axis` of the closest RAS orientation."""
    for volume in probabilities:
        view = slice_volume(canonical_view(volume, data.affine), axis)
        view[...] = consistent_slices(view)


def checked_device(device: str | torch.device | None, option: str = "device") -> torch.device:
    """The torch device for `device` (None: cuda when present, else cpu); InputError naming `option`
    for unknown devices, devices other than cpu and cuda (meta, mps, ...) and absent CUDA
    devices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(option, f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(option, f"{device} requested but no CUDA GPU is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(
                option,
                f"{device} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
            )
    elif resolved.type != "cpu":
        raise InputError(option, f"unsupported device {str(device)!r}; use cpu, cuda or cuda:N")
    return resolved


def check_threshold(threshold: float) -> None:
    """InputError unless `threshold` is a number strictly between 0 and 1 (NaN is not)."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float, np.floating))
        or not 0 < threshold < 1
    ):
        raise InputError("threshold", f"must lie strictly between 0 and 1, got {threshold!r}")


def as_volume(volume: ArrayOrPath | ImageData) -> ImageData:
    """A NIfTI path, an ImageData or an (X, Y, Z) array -> ImageData."""
    if isinstance(volume, ImageData):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return read_image(volume)
    return ImageData(check_image_array(np.asarray(volume), "volume"), True, None, None, "volume")
