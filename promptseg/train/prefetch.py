"""Episode batches prepared in worker processes while the model steps (torch DataLoader).

`sample_batch(step, episodes)` is a pure function of the step, so a worker can build the batches
of steps [start, stop) ahead of the model and the run stays exactly reproducible. Workers are
forked: the task arrays (memory-mapped pack files or in-memory arrays) are shared, not copied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from promptseg.data.episodes import EpisodeBatch, EpisodeSampler


class StepBatches(Dataset):
    """Item `step` is the EpisodeBatch of that training step for this rank."""

    def __init__(
        self, sampler: EpisodeSampler, episodes: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.sampler = sampler
        self.episodes = episodes
        self.rank = rank
        self.world_size = world_size

    def __getitem__(self, step: int) -> EpisodeBatch:
        return self.sampler.sample_batch(step * self.world_size + self.rank, self.episodes)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)
    os.nice(10)


def step_batches(
    batches: StepBatches, start: int, stop: int, workers: int, prefetch: int = 4
) -> Iterator[EpisodeBatch]:
    """The batches of steps start..stop-1 in order; built in `workers` processes (one torch thread
    each, `prefetch` batches ahead per worker), or in this process when workers == 0."""
    steps = range(start, stop)
    if workers <= 0:
        return (batches[step] for step in steps)
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        prefetch_factor=prefetch,
        worker_init_fn=_one_thread,
        multiprocessing_context="fork",
    )
    return iter(loader)
