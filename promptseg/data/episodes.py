"""Episodes (K prompts + Q queries of one task) for training and evaluation.

Training batches come from `EpisodeSampler.sample_batch(step, episodes)`, a pure function of
(seed, step, episodes) so that a run resumed at step N sees exactly the same data. Evaluation uses
`fixed_episodes`, deterministic and unaugmented, so the model and the baselines see identical
episodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from promptseg.data.augment import TaskAugmentation, augment_examples
from promptseg.data.preprocess import resize_image, resize_mask
from promptseg.data.prompts import SPARSE_KINDS, sparse_prompt_map
from promptseg.data.synthetic import synthetic_task, synthetic_volume_task
from promptseg.data.tasks import ArrayTask
from promptseg.model.prompt_types import PROMPT_TYPES

CHANNELS = (
    3  # default image channels: ModelConfig.in_channels' default (docs/design.md section 2.1)
)
VOLUME_QUERY_NONEMPTY_FRACTION = 0.6  # phantom-volume queries: 40 % may lack the target


@dataclass
class Episode:
    """One task's prompts and queries. Images float32 in [0, 1], masks / maps float32 in {0, 1}.

    prompt_images (K, C, R, R); prompt_maps (K, R, R): the mask for a mask prompt, the rasterised
    click / box / scribble for a sparse prompt; prompt_types (K,) int64 (PROMPT_TYPES values);
    query_images (Q, C, R, R); query_masks (Q, R, R); task: the task's name.
    """

    prompt_images: torch.Tensor
    prompt_maps: torch.Tensor
    prompt_types: torch.Tensor
    query_images: torch.Tensor
    query_masks: torch.Tensor
    task: str


@dataclass
class EpisodeBatch:
    """E episodes sharing K and Q: the Episode fields stacked on a leading episode axis
    (prompt_images (E, K, C, R, R), prompt_maps (E, K, R, R), prompt_types (E, K),
    query_images (E, Q, C, R, R), query_masks (E, Q, R, R)) and the task names."""

    prompt_images: torch.Tensor
    prompt_maps: torch.Tensor
    prompt_types: torch.Tensor
    query_images: torch.Tensor
    query_masks: torch.Tensor
    tasks: list[str]

    @classmethod
    def stack(cls, episodes: Sequence[Episode]) -> EpisodeBatch:
        """Stack episodes of equal K, Q, C and R."""
        return cls(
            prompt_images=torch.stack([e.prompt_images for e in episodes]),
            prompt_maps=torch.stack([e.prompt_maps for e in episodes]),
            prompt_types=torch.stack([e.prompt_types for e in episodes]),
            query_images=torch.stack([e.query_images for e in episodes]),
            query_masks=torch.stack([e.query_masks for e in episodes]),
            tasks=[e.task for e in episodes],
        )


def load_examples(
    task: ArrayTask, indices: np.ndarray, resolution: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples `indices` of `task` as images (N, channels, R, R) float32 in [0, 1] and masks
    (N, R, R) float32 in {0, 1}, resized to `resolution` and grayscale replicated when needed."""
    images = task.images[indices]
    images = torch.from_numpy(np.ascontiguousarray(images)).float()
    if task.images.dtype == np.uint8:
        images = images / 255.0
    if images.shape[1] == 1 and channels != 1:
        images = images.expand(-1, channels, -1, -1)
    masks = torch.from_numpy(np.ascontiguousarray(task.masks[indices])).float()
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = resize_image(images, resolution).clamp(0.0, 1.0)
        masks = (resize_mask(masks, resolution) > 0.5).float()
    return images.contiguous(), masks


def _draw_examples(
    task: ArrayTask,
    prompts: int,
    queries: int,
    nonempty_fraction: float,
    rng: np.random.Generator,
    query_nonempty_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `prompts` prompts and `queries` queries, all distinct when the task is big enough.

    Each slot asks for a non-empty mask with probability `nonempty_fraction` (any example
    otherwise); query slots use `query_nonempty_fraction` instead when it is given.
    Queries are drawn first; when distinct examples run out, prompts repeat examples (avoiding the
    queries where possible) and queries repeat as a last resort.
    """
    size = len(task)
    nonempty = task.nonempty()
    orders = {
        True: rng.permutation(nonempty) if len(nonempty) else rng.permutation(size),
        False: rng.permutation(size),
    }
    cursor = {True: 0, False: 0}
    used = np.zeros(size, dtype=bool)
    draws = rng.random(queries + prompts)
    query_fraction = (
        nonempty_fraction if query_nonempty_fraction is None else query_nonempty_fraction
    )
    wants = np.concatenate([draws[:queries] < query_fraction, draws[queries:] < nonempty_fraction])
    chosen = np.empty(queries + prompts, dtype=np.int64)
    for slot, want in enumerate(wants):
        pick = -1
        for key in (bool(want), False):
            order = orders[key]
            while cursor[key] < len(order) and used[order[cursor[key]]]:
                cursor[key] += 1
            if cursor[key] < len(order):
                pick = int(order[cursor[key]])
                break
        if pick < 0:
            pool = orders[bool(want)]
            spare = pool[~np.isin(pool, chosen[:queries])] if slot >= queries else pool
            pick = int(rng.choice(spare if len(spare) else pool))
        used[pick] = True
        chosen[slot] = pick
    return chosen[queries:], chosen[:queries]


class EpisodeSampler:
    """Random training episodes from real tasks and fresh synthetic ones.

    Real tasks are drawn with probabilities `task_weights` (see `base_task_weights`: uniform over
    groups (datasets), then uniformly over the group's tasks, i.e. its labels, unless the trainer
    reweights them by hardness); with probability `synthetic_fraction` (always when `tasks` is
    empty) an episode uses a new synthetic task instead. K is drawn log-uniformly in `shots`
    (inclusive) once per batch; Q = `queries`. Each episode gets one task augmentation (all its
    images alike) and per-image augmentation; with probability `sparse_fraction` every prompt map
    becomes a click, box or scribble (kind drawn per prompt) derived from the augmented mask, and
    with probability `self_query_fraction` such an episode's first query is its first prompt image
    itself (interactive use: segment the image that was clicked).
    """

    def __init__(
        self,
        tasks: Sequence[ArrayTask],
        resolution: int,
        shots: tuple[int, int] = (1, 16),
        queries: int = 4,
        synthetic_fraction: float = 0.3,
        sparse_fraction: float = 0.15,
        task_augment: bool = True,
        image_augment: bool = True,
        nonempty_fraction: float = 0.9,
        seed: int = 0,
        volume_fraction: float = 0.0,
        self_query_fraction: float = 0.0,
        channels: int = CHANNELS,
    ) -> None:
        if not 1 <= shots[0] <= shots[1]:
            raise ValueError(f"shots must satisfy 1 <= low <= high, got {shots}")
        self.tasks = list(tasks)
        self.resolution = resolution
        self.shots = shots
        self.queries = queries
        self.synthetic_fraction = synthetic_fraction
        self.sparse_fraction = sparse_fraction
        self.task_augment = task_augment
        self.image_augment = image_augment
        self.nonempty_fraction = nonempty_fraction
        self.seed = seed
        self.volume_fraction = volume_fraction
        self.self_query_fraction = self_query_fraction
        self.channels = channels  # the model's in_channels: images (.., channels, R, R)
        self.task_weights = base_task_weights(self.tasks)
        self.augmentation = TaskAugmentation()

    def set_task_weights(self, weights: np.ndarray) -> None:
        """Draw real tasks with probabilities proportional to `weights` (len(tasks),), all >= 0."""
        weights = np.asarray(weights, dtype=np.float64)
        if (
            weights.shape != (len(self.tasks),)
            or not np.isfinite(weights).all()
            or (weights < 0).any()
            or weights.sum() <= 0
        ):
            raise ValueError(
                f"task weights must be {len(self.tasks)} finite non-negative numbers with a "
                "positive sum"
            )
        self.task_weights = weights / weights.sum()

    def sample_shots(self, rng: np.random.Generator) -> int:
        """K log-uniform over the integers in `shots`."""
        low, high = self.shots
        return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))

    def choose_task(self, rng: np.random.Generator, examples: int) -> ArrayTask:
        """A real task (drawn by `task_weights`) or a fresh synthetic task."""
        if not self.tasks or rng.random() < self.synthetic_fraction:
            if rng.random() < self.volume_fraction:
                return synthetic_volume_task(rng, self.resolution, channels=self.channels)
            return synthetic_task(rng, self.resolution, examples, self.channels)
        return self.tasks[int(rng.choice(len(self.tasks), p=self.task_weights))]

    def sample_episode(self, rng: np.random.Generator, shots: int) -> Episode:
        """One augmented episode with `shots` prompts and `queries` queries."""
        task = self.choose_task(rng, shots + self.queries)
        # Volume tasks ask for more queries without the target, as whole-volume inference meets
        # them.
        query_nonempty = (
            VOLUME_QUERY_NONEMPTY_FRACTION if task.group == "synthetic_volume" else None
        )
        prompts, queries = _draw_examples(
            task, shots, self.queries, self.nonempty_fraction, rng, query_nonempty
        )
        sparse = rng.random() < self.sparse_fraction
        if sparse and rng.random() < self.self_query_fraction:
            queries[0] = prompts[0]
        images, masks = load_examples(
            task, np.concatenate([prompts, queries]), self.resolution, self.channels
        )
        if self.task_augment:
            images, masks = self.augmentation(images, masks, rng)
        if self.image_augment:
            images, masks = augment_examples(images, masks, rng)
        maps = masks[:shots]
        types = torch.full((shots,), PROMPT_TYPES["mask"], dtype=torch.int64)
        if sparse:
            kinds = rng.choice(SPARSE_KINDS, size=shots)
            maps = torch.stack(
                [sparse_prompt_map(m, str(kind), rng) for m, kind in zip(maps, kinds)]
            )
            types = torch.tensor([PROMPT_TYPES[str(kind)] for kind in kinds], dtype=torch.int64)
        return Episode(images[:shots], maps, types, images[shots:], masks[shots:], task.name)

    def sample_batch(self, step: int, episodes: int) -> EpisodeBatch:
        """`episodes` episodes sharing one K; a pure function of (seed, step, episodes)."""
        rng = np.random.default_rng([self.seed, step])
        shots = self.sample_shots(rng)
        return EpisodeBatch.stack([self.sample_episode(rng, shots) for _ in range(episodes)])


def base_task_weights(tasks: Sequence[ArrayTask]) -> np.ndarray:
    """(len(tasks),) probabilities: each group (dataset) alike, each task (label) of a group alike,
    so a dataset with one thin label gets the same share as one with eight organs."""
    if not tasks:
        return np.zeros(0)
    groups: dict[str, int] = {}
    for task in tasks:
        groups[task.group] = groups.get(task.group, 0) + 1
    weights = np.array([1.0 / groups[task.group] for task in tasks])
    return weights / weights.sum()


def fixed_episodes(
    task: ArrayTask,
    shots: int,
    queries: int,
    count: int,
    seed: int,
    prompt_kind: str = "mask",
    query_prompts: bool = False,
    channels: int = CHANNELS,
) -> list[Episode]:
    """`count` deterministic, unaugmented evaluation episodes of `task` at its own resolution.

    Queries and prompts are non-empty examples; queries walk through one random permutation of them
    (so successive episodes query different examples, wrapping around when exhausted), Q =
    min(queries, non-empty examples - 1); prompts are drawn among the other non-empty examples (with
    replacement only when fewer than `shots` remain). With `task.query_examples`, queries come from
    the marked examples and prompts from the others. `prompt_kind` "click", "box" or "scribble"
    turns every prompt mask into that sparse prompt (drawn from the episode's seed); `query_prompts`
    makes the queries the prompt images themselves (Q = K: how well the model segments the image it
    was prompted on). Raises ValueError when the task has < 2 non-empty examples.
    """
    if prompt_kind != "mask" and prompt_kind not in SPARSE_KINDS:
        raise ValueError(
            f"unknown prompt kind {prompt_kind!r}; expected mask or one of {SPARSE_KINDS}"
        )
    nonempty = task.nonempty()
    if len(nonempty) < 2:
        raise ValueError(
            f"task {task.name}: fixed episodes need at least 2 non-empty examples, got "
            f"{len(nonempty)}"
        )
    rng = np.random.default_rng(seed)
    pool = nonempty if task.query_examples is None else nonempty[task.query_examples[nonempty]]
    prompt_pool = (
        nonempty if task.query_examples is None else nonempty[~task.query_examples[nonempty]]
    )
    if len(pool) == 0 or len(prompt_pool) == 0:
        raise ValueError(
            f"task {task.name}: fixed episodes need a non-empty query and prompt example"
        )
    order = rng.permutation(pool)
    q = min(queries, len(nonempty) - 1, len(pool))
    resolution = task.images.shape[-1]
    out = []
    for index in range(count):
        query = order[(index * q + np.arange(q)) % len(order)]
        candidates = np.setdiff1d(prompt_pool, query)
        prompt = rng.choice(candidates, size=shots, replace=len(candidates) < shots)
        if query_prompts:
            query = prompt
        images, masks = load_examples(task, np.concatenate([prompt, query]), resolution, channels)
        maps = masks[:shots]
        types = torch.full((shots,), PROMPT_TYPES[prompt_kind], dtype=torch.int64)
        if prompt_kind != "mask":
            prompt_rng = np.random.default_rng([seed, index])
            maps = torch.stack([sparse_prompt_map(m, prompt_kind, prompt_rng) for m in maps])
        out.append(Episode(images[:shots], maps, types, images[shots:], masks[shots:], task.name))
    return out
