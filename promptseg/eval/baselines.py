"""Predictors compared by `promptseg.eval.evaluate` (docs/design.md section 8).

Every predictor maps an Episode (K prompts, Q queries at resolution R) to foreground probabilities
(Q, R, R) float32 in [0, 1] on the CPU:

- `NearestPromptBaseline`: copies the prompt map of the most similar prompt image.
- `FineTunedUNetBaseline`: a small U-Net trained from scratch on the episode's K prompt pairs.
- `ModelPredictor`: a PromptSegNet, no gradient step.

The baselines treat the prompt map as the label, so they are meant for mask prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.data.episodes import Episode
from promptseg.engine.adaptation import Adaptation, adapt_to_prompts
from promptseg.engine.backends import InferenceBackend, PromptState, create_backend
from promptseg.engine.ensemble import (
    build_ensemble,
    decision_threshold,
    flipped,
    mean_probabilities,
    plan_members,
)
from promptseg.engine.model_corrections import correction_input, mark_arrays
from promptseg.errors import InputError
from promptseg.eval.prediction import Prediction
from promptseg.model import PromptSegNet
from promptseg.model.loss import segmentation_loss


class Predictor(Protocol):
    """Anything with `predict(episode) -> (Q, R, R)` float32 probabilities in [0, 1]."""

    def predict(self, episode: Episode) -> torch.Tensor: ...


def _tensor(value: torch.Tensor) -> torch.Tensor:
    """Episode field -> float32 CPU tensor."""
    return value.detach().to("cpu", torch.float32)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (N, C, H, W) to (N, C, size, size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = size < x.shape[-1]
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )


def prompts_at(episode: Episode, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's prompt images (K, C, size, size) and prompt maps (K, size, size), resized to
    `size` and the maps re-binarised at 0.5, as float32 CPU tensors."""
    images = _resize(_tensor(episode.prompt_images), size)
    maps = (_resize(_tensor(episode.prompt_maps)[:, None], size)[:, 0] > 0.5).float()
    return images, maps


class NearestPromptBaseline:
    """Label transfer from the most similar prompt.

    Similarity of two images: each is area-downsampled (or replicated up) to 32x32 per channel,
    flattened and normalised to zero mean and unit variance; the score is the cosine similarity of
    those vectors (i.e. their Pearson correlation), so it ignores global brightness and contrast.
    Each query receives the binarised (> 0.5) prompt map of its best-scoring prompt (the first on
    ties).
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, R, R) -> unit-norm descriptors (N, C * size * size)."""
        small = F.adaptive_avg_pool2d(images, self.size).flatten(1)
        centred = small - small.mean(dim=1, keepdim=True)
        standardised = centred / small.std(dim=1, keepdim=True).clamp_min(1e-6)
        return F.normalize(standardised, dim=1)

    def similarity(self, queries: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """queries (Q, C, R, R), prompts (K, C, R, R) -> cosine similarities (Q, K)."""
        return self.features(queries) @ self.features(prompts).T

    def predict(self, episode: Episode) -> torch.Tensor:
        """-> (Q, R, R) float32 in {0, 1}."""
        prompts, maps = _tensor(episode.prompt_images), _tensor(episode.prompt_maps)
        best = self.similarity(_tensor(episode.query_images), prompts).argmax(dim=1)
        return (maps[best] > 0.5).float()


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm (batch-size independent, so K = 1 trains) and GELU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout // 4), cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout // 4), cout),
        nn.GELU(),
    )


class SmallUNet(nn.Module):
    """Three-level U-Net (strides 1, 2, 4; widths w, 2w, 4w): (N, C, H, W) -> logits (N, H, W).

    H and W must be multiples of 4. About 110 k parameters at w = 16, C = 3.
    """

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = _conv_block(in_channels, w1)
        self.enc2 = _conv_block(w1, w2)
        self.enc3 = _conv_block(w2, w3)
        self.up2 = nn.Conv2d(w3, w2, 1)
        self.dec2 = _conv_block(2 * w2, w2)
        self.up1 = nn.Conv2d(w2, w1, 1)
        self.dec1 = _conv_block(2 * w1, w1)
        self.head = nn.Conv2d(w1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s3 = self.enc3(F.max_pool2d(s2, 2))
        d2 = self.dec2(
            torch.cat([s2, F.interpolate(self.up2(s3), scale_factor=2.0, mode="bilinear")], dim=1)
        )
        d1 = self.dec1(
            torch.cat([s1, F.interpolate(self.up1(d2), scale_factor=2.0, mode="bilinear")], dim=1)
        )
        return self.head(d1)[:, 0]


def _random_flips(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent random horizontal and vertical flips per example of images (N, C, H, W), masks
    (N, H, W)."""
    for image_dim, mask_dim in ((-1, -1), (-2, -2)):
        flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(image_dim), images)
        masks = torch.where(flip[:, None, None], masks.flip(mask_dim), masks)
    return images, masks


class FineTunedUNetBaseline:
    """A `SmallUNet` trained from scratch on the K prompt pairs of each episode, then applied to its
    queries.

    Budget per episode: `steps` AdamW steps (weight decay 1e-4) at learning rate `lr` on BCE + soft
    Dice, each on a minibatch of min(K, batch_size) prompt pairs drawn without replacement, with
    random horizontal / vertical flips. Images and maps are resized to `resolution` (a multiple of
    4; the episode resolution when that is smaller, rounded down to a multiple of 4) and the query
    probabilities are resized back to R. Every episode starts from the same initialisation, and the
    whole run is a function of `seed` (the global torch RNG is left untouched). Training runs on
    `device`; on 2 CPU cores the defaults cost about 1-5 s per episode (K = 1 to 16, R >= 64).
    """

    def __init__(
        self,
        steps: int = 60,
        lr: float = 3e-3,
        width: int = 16,
        seed: int = 0,
        resolution: int = 64,
        batch_size: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        if resolution < 4 or resolution % 4:
            raise ValueError(f"resolution must be a positive multiple of 4, got {resolution}")
        self.steps, self.lr, self.width, self.seed = steps, lr, width, seed
        self.resolution, self.batch_size = resolution, batch_size
        self.device = torch.device(device)

    def working_size(self, size: int) -> int:
        """Training resolution for an episode at resolution `size`."""
        return min(self.resolution, size // 4 * 4)

    def fit(self, images: torch.Tensor, masks: torch.Tensor) -> SmallUNet:
        """Train a fresh SmallUNet on images (K, C, S, S) and masks (K, S, S) in [0, 1]; returns it
        in eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = SmallUNet(images.shape[1], self.width).to(self.device)
        images, masks = images.to(self.device), masks.to(self.device)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-4)
        batch = min(len(images), self.batch_size)
        net.train()
        for _ in range(self.steps):
            pick = torch.randperm(len(images), generator=generator)[:batch].to(self.device)
            x, y = _random_flips(images[pick], masks[pick], generator)
            loss = segmentation_loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return net.eval()

    def predict(self, episode: Episode) -> torch.Tensor:
        """-> (Q, R, R) float32 probabilities."""
        queries = _tensor(episode.query_images)
        size, work = queries.shape[-1], self.working_size(queries.shape[-1])
        images = _resize(_tensor(episode.prompt_images), work)
        masks = _resize(_tensor(episode.prompt_maps)[:, None], work)[:, 0].clamp(0.0, 1.0)
        net = self.fit(images, masks)
        with torch.no_grad():
            logits = net(_resize(queries, work).to(self.device)).cpu()
        return torch.sigmoid(_resize(logits[:, None], size)[:, 0])


class ModelPredictor:
    """A PromptSegNet as a predictor: all queries of an episode in one forward pass.

    Episodes at another resolution than the model's are resized to it (prompt maps re-binarised at
    0.5) and the probabilities are resized back. With `adaptation`, a copy of the model is first
    adapted to the episode's prompts (promptseg.engine.adaptation; the model itself never changes);
    with `ensemble` > 1, the probabilities are the mean over that many members of the Segmenter's
    ensemble, and with `ensemble_shift` the mask threshold moves by its leave-one-out logit shift
    (`predict_with_threshold`; promptseg.engine.ensemble).
    """

    def __init__(
        self,
        model: PromptSegNet,
        device: torch.device | str = "cpu",
        adaptation: Adaptation | None = None,
        ensemble: int = 1,
        ensemble_shift: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.adaptation = adaptation
        self.ensemble = ensemble
        self.ensemble_shift = ensemble_shift

    def predict(self, episode: Episode) -> torch.Tensor:
        """-> (Q, R, R) float32 probabilities (sigmoid of the logits; an ensemble's unshifted
        mean)."""
        return self.predict_with_threshold(episode).probabilities

    def predict_with_threshold(self, episode: Episode) -> Prediction:
        """-> the probabilities of `predict` and the threshold of the mask (0.5 unless an ensemble
        shifts it)."""
        queries = _tensor(episode.query_images)
        size, work = queries.shape[-1], self.model.config.resolution
        images, maps = prompts_at(episode, work)
        types = episode.prompt_types.long()
        model = self.model
        if self.adaptation is not None and self.adaptation.steps > 0:
            model = adapt_to_prompts(model, images, maps, types, self.adaptation)
        work_queries = _resize(queries, work)
        threshold = 0.5
        if self.ensemble > 1:
            probs, shift = ensemble_probabilities(
                create_backend("torch", model, self.device),
                images,
                maps,
                types,
                work_queries,
                self.ensemble,
                self.ensemble_shift,
            )
            threshold = decision_threshold(0.5, shift)
        else:
            with torch.inference_mode():
                logits = model(
                    images[None].to(self.device),
                    maps[None].to(self.device),
                    types[None].to(self.device),
                    work_queries.to(self.device),
                )
            probs = torch.sigmoid(logits.float())
        return Prediction(
            _resize(probs.float().cpu()[:, None], size)[:, 0].clamp(0.0, 1.0), threshold
        )

    def corrector(
        self, episode: Episode
    ) -> Callable[[int, Sequence[tuple], Sequence[tuple]], torch.Tensor]:
        """For a query-corrections model: encode the episode's prompts once and return
        decode(query index, clicks (x, y, positive), scribbles (strokes (R, R), positive) on the
        (R, R) query) -> (R, R) probabilities of that query segmented again with them as input
        (promptseg.engine.model_corrections)."""
        if not self.model.config.query_corrections:
            raise InputError("--interactive-corrections", "this model reads no query corrections")
        work = self.model.config.resolution
        images, maps = prompts_at(episode, work)
        queries = _resize(_tensor(episode.query_images), work).to(self.device)
        size = episode.query_images.shape[-1]
        with torch.inference_mode():
            encoding = self.model.encode_prompts(
                images[None].to(self.device),
                maps[None].to(self.device),
                episode.prompt_types.long()[None].to(self.device),
            )

        def decode(
            index: int, clicks: Sequence[tuple], scribbles: Sequence[tuple] = ()
        ) -> torch.Tensor:
            marks = mark_arrays((size, size), clicks, scribbles)
            corrections = correction_input(*marks, work)
            with torch.inference_mode():
                logits = self.model.decode(
                    queries[index : index + 1], encoding, corrections[None].to(self.device)
                )
            probabilities = torch.sigmoid(logits.float()).cpu()[:, None]
            return _resize(probabilities, size)[0, 0].clamp(0.0, 1.0)

        return decode


def ensemble_probabilities(
    backend: InferenceBackend,
    images: torch.Tensor,
    maps: torch.Tensor,
    types: torch.Tensor,
    queries: torch.Tensor,
    members: int,
    shift: bool = True,
) -> tuple[torch.Tensor, float]:
    """The probability (Q, R, R) of the first `members` ensemble members (mean_probabilities of
    promptseg.engine.ensemble, as the Segmenter builds them) and the logit shift of their decision
    threshold (0.0 unless `shift`): images (K, C, R, R), maps (K, R, R), types (K,), queries (Q, C,
    R, R). Each flip of the prompt set is encoded once."""
    encoded: dict[tuple[int, ...], PromptState] = {}

    def encode(flip: tuple[int, ...], keep: tuple[int, ...]) -> PromptState:
        index = list(keep)
        key = (flip, keep)
        if key not in encoded:
            encoded[key] = backend.encode(
                flipped(images[None, index], flip),
                flipped(maps[None, index], flip),
                types[None, index],
            )
        return encoded[key]

    ensemble = build_ensemble(
        backend,
        images[None],
        maps[None],
        types[None],
        plan_members(len(images), members),
        encode,
        shift,
    )
    return mean_probabilities(
        ensemble, queries, backend.decode_mean, backend.decode_members
    ), ensemble.shift
