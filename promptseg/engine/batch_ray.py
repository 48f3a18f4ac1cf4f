"""The Ray engine of `promptseg batch` (--engine ray): the batch units run on Ray actors, one model
each.

Each actor (one per GPU where the cluster has GPUs, else one per CPU asked for) builds its own
Segmenter and runs batch.run_unit, writing the outputs itself, so DIR must be storage every node
sees. The units of one prompt set go to one actor (prompt sets spread over the actors by job count),
so each prompt set is encoded once per actor that needs it. The driver keeps the job log: a unit's
jobs are logged as started when it is submitted and as done or failed as its results come back, so
a rerun resumes exactly as with the local engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from promptseg.engine.batch import (
    Executor,
    JobResult,
    Options,
    PromptSpec,
    Unit,
    run_unit,
)
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import InputError, short_reason

RAY_EXTRA = "pip install 'promptseg[ray]'"
DEFAULT_CPU_WORKERS = 2


def _ray() -> Any:
    """The ray module, or an InputError naming --engine and the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError(
            "--engine", f"ray needs Ray, which is not installed: {RAY_EXTRA}"
        ) from None
    return ray


class BatchWorker:
    """A Ray actor's state: one Segmenter (built in the actor) and the batch options.

    threads: torch intra-op threads of this actor (its share of the node's CPUs)."""

    def __init__(
        self, make_segmenter: Callable[[], Segmenter], options: Options, threads: int
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.segmenter = make_segmenter()
        self.options = options

    def run(self, unit: Unit) -> list[JobResult]:
        return run_unit(self.segmenter, unit, self.options)


def assign(units: Sequence[Unit], workers: int) -> list[list[Unit]]:
    """Units per worker: every unit of one prompt set on one worker, the prompt sets (largest first)
    each given to the worker with the fewest pending jobs so far."""
    groups: dict[PromptSpec, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.prompts, []).append(unit)
    queues: list[list[Unit]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for members in sorted(groups.values(), key=lambda g: -sum(len(u.pending) for u in g)):
        target = loads.index(min(loads))
        queues[target] += members
        loads[target] += sum(len(u.pending) for u in members)
    return queues


def ray_executor(
    make_segmenter: Callable[[], Segmenter],
    options: Options,
    workers: int | None,
    address: str | None,
) -> Executor:
    """An Executor running the units on `workers` Ray actors (default: one per GPU, else 2) of the
    cluster at `address`, or of a Ray instance started here when None (shut down afterwards).
    make_segmenter must be picklable (it is called in each actor)."""
    ray = _ray()

    def execute(
        units: Sequence[Unit], started: Callable[[Unit], None]
    ) -> Iterator[tuple[Unit, list[JobResult]]]:
        if not units:
            return
        owns = not ray.is_initialized()
        if owns:
            wanted = workers or DEFAULT_CPU_WORKERS
            local = {} if address is not None else {"num_cpus": max(wanted, os.cpu_count() or 1)}
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                    **local,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(
                    "--address" if address else "--engine",
                    f"cannot start or join Ray ({short_reason(exc)})",
                ) from None
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            count = workers or (gpus if gpus else DEFAULT_CPU_WORKERS)
            actor_class = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(BatchWorker)
            actors = [actor_class.remote(make_segmenter, options, 1) for _ in range(count)]
            pending: dict[Any, Unit] = {}
            for actor, queue in zip(actors, assign(units, count)):
                for unit in queue:
                    started(unit)
                    pending[actor.run.remote(unit)] = unit
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                try:
                    results = ray.get(ready[0])
                except (
                    ray.exceptions.RayActorError
                ) as exc:  # the actor died (killed, out of memory)
                    reason = f"Ray worker died ({short_reason(exc)})"
                    results = [
                        JobResult(name, "failed", reason=reason) for name in sorted(unit.pending)
                    ]
                yield unit, results
        finally:
            if owns:
                ray.shutdown()

    return execute
