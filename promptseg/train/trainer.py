"""The training loop: episodic CE + Dice training, single process or torchrun/DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from promptseg.data.episodes import (
    EpisodeBatch,
    EpisodeSampler,
    base_task_weights,
    fixed_episodes,
)
from promptseg.data.tasks import ArrayTask
from promptseg.errors import CheckpointError, InputError
from promptseg.files import sweep_stale_temporaries, write_text
from promptseg.kernels import default_kernel
from promptseg.metrics import hard_dice
from promptseg.model import PromptSegNet
from promptseg.model.loss import segmentation_losses
from promptseg.model.query_corrections import CORRECTION_PREFIXES
from promptseg.model.weights import load_state, read_training_record, read_weights, save_weights
from promptseg.train.checkpoint import load_training_checkpoint, save_training_checkpoint
from promptseg.train.config import TrainConfig
from promptseg.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown,
)
from promptseg.train.prefetch import StepBatches, step_batches
from promptseg.train.schedule import learning_rate
from promptseg.train.simulated_corrections import (
    clicked_regions,
    correction_counts,
    error_clicks,
    maps_of,
    round_counts,
)
from promptseg.train.task_balance import TaskHardness
from promptseg.train.training_log import read_log_records


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_autocast_available(device: torch.device) -> bool:
    """Whether `autocast_for` runs bf16 on `device` (CUDA with bf16, or a CPU with native bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast where `bf16_autocast_available`; full precision elsewhere (or when not
    enabled). The label-propagation prior always runs in float32 (its logits reach +-150)."""
    if enabled and bf16_autocast_available(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to(batch: EpisodeBatch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """EpisodeBatch -> (prompt images, maps, types, queries (E*Q, C, R, R), targets (E*Q, R, R)) on
    device."""
    return (
        batch.prompt_images.to(device),
        batch.prompt_maps.to(device),
        batch.prompt_types.to(device),
        batch.query_images.flatten(0, 1).to(device),
        batch.query_masks.flatten(0, 1).to(device),
    )


@torch.no_grad()
def validation_dice(
    model: PromptSegNet, tasks: Sequence[ArrayTask], shots: int, episodes: int, device: torch.device
) -> dict[str, float]:
    """Mean Dice (0-100) of thresholded predictions over fixed episodes of each task."""
    was_training = model.training
    model.eval()
    scores = {}
    for task in tasks:
        values = []
        for episode in fixed_episodes(
            task, shots=shots, queries=4, count=episodes, seed=0, channels=model.config.in_channels
        ):
            logits = model(
                episode.prompt_images[None].to(device),
                episode.prompt_maps[None].to(device),
                episode.prompt_types[None].to(device),
                episode.query_images.to(device),
            )
            values.append(hard_dice(logits > 0, episode.query_masks.to(device) > 0.5).mean().item())
        scores[task.name] = 100.0 * float(np.mean(values))
    model.train(was_training)
    return scores


def decay_groups(
    model: torch.nn.Module, weight_decay: float, correction_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices and kernels only, none on biases, norm
    scales and scalars such as the propagation temperature and the prior gain. A query-corrections
    model's correction layers (the encoder's stem and the decoder's fuse, zero at the start) have a
    group of their own whose learning rate is `correction_lr_scale` times the schedule's
    ("lr_scale" of every group)."""
    named = list(model.named_parameters())
    corrections = [p for n, p in named if n.startswith(CORRECTION_PREFIXES)]
    rest = [p for n, p in named if not n.startswith(CORRECTION_PREFIXES)]
    groups = [
        {
            "params": [p for p in rest if p.dim() >= 2],
            "weight_decay": weight_decay,
            "lr_scale": 1.0,
        },
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if corrections:
        groups.append(
            {"params": corrections, "weight_decay": weight_decay, "lr_scale": correction_lr_scale}
        )
    return groups


def compute_record(prior: dict, run: dict, steps: int) -> dict:
    """Cumulative compute behind a run's weights: episodes and core-hours (wall time x threads and
    loader workers) of the --init weights (`prior`, with their runs) plus this run's, and one entry
    per run. `prior` and `run` are what checkpoints store under "compute"."""
    return {
        "episodes": prior["episodes"] + run["episodes"],
        "core_hours": prior["core_hours"] + run["core_hours"],
        "runs": [*prior["runs"], {**run, "steps": steps}],
    }


def checkpoint_compute_record(meta: dict) -> dict:
    """`compute_record` of a training checkpoint's JSON (step-N.json)."""
    compute = meta.get("compute", {})
    prior = compute.get("prior", {"episodes": 0, "core_hours": 0.0, "runs": []})
    run = compute.get("run", {"episodes": 0, "core_hours": 0.0})
    return compute_record(prior, run, int(meta["step"]))


class Trainer:
    """Owns the model, optimizer and sampler of one run and steps through it."""

    def __init__(
        self,
        config: TrainConfig,
        tasks: Sequence[ArrayTask],
        out_dir: str | Path,
        val_tasks: Sequence[ArrayTask] = (),
        context: DistributedContext | None = None,
        progress: bool = True,
        init: str | Path | None = None,
    ) -> None:
        problems = config.problems()
        if problems:  # a config built in code, not read through TrainConfig.load, is checked here
            raise InputError("training config", problems[0])
        self.config = config
        self.out_dir = Path(out_dir)
        self.val_tasks = list(val_tasks)
        self.context = context or init_distributed()
        self.progress = progress and self.context.is_main
        torch.manual_seed(config.seed)
        self.model = PromptSegNet(config.model_config()).to(self.context.device)
        self.model.set_attention_kernel(
            config.attention_kernel or default_kernel(self.context.device)
        )
        self.model.train()
        # Compute behind the weights: what the --init weights carried, plus this run (resume keeps
        # it).
        self.prior_compute = {"episodes": 0, "core_hours": 0.0, "runs": []}
        if init is not None:
            self.warm_start(init)
        self.run_compute = {"episodes": 0, "core_hours": 0.0, "device": self.device_name()}
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, config.weight_decay, config.correction_lr_scale),
            lr=config.lr,
        )
        self.network: torch.nn.Module = self.model
        if self.context.world_size > 1:
            ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)
        self.sampler = EpisodeSampler(
            list(tasks),
            resolution=self.model.config.resolution,
            shots=tuple(config.shots),
            queries=config.queries,
            synthetic_fraction=config.synthetic_fraction,
            sparse_fraction=config.sparse_fraction,
            task_augment=config.task_augment,
            image_augment=config.image_augment,
            seed=config.seed,
            volume_fraction=config.volume_fraction,
            self_query_fraction=config.self_query_fraction,
            channels=self.model.config.in_channels,
        )
        self.hardness = TaskHardness()
        self.task_names = [task.name for task in tasks]
        self.base_weights = base_task_weights(list(tasks))
        self.step = 0

    def device_name(self) -> str:
        device = self.context.device
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        return f"cpu ({torch.get_num_threads()} threads)"

    def warm_start(self, path: str | Path) -> None:
        """Start from the weights file `path` (same model config; the optimizer starts afresh)."""
        config, tensors = read_weights(path)
        # sparse_unknown changes how the prior reads sparse prompts, not the tensors: a run may
        # switch it. Weights without query corrections warm-start a model with them: its
        # correction layers start at zero, so the model starts as the weights.
        own = self.model.config
        adds_corrections = own.query_corrections and not config.query_corrections
        if (
            dataclasses.replace(
                config,
                sparse_unknown=own.sparse_unknown,
                query_corrections=config.query_corrections or adds_corrections,
            )
            != own
        ):
            raise CheckpointError(
                f"{path}: --init weights have another model config than the recipe ({config})"
            )
        if adds_corrections:
            stem = {
                n: t
                for n, t in self.model.state_dict().items()
                if n.startswith(CORRECTION_PREFIXES)
            }
            tensors = {**stem, **tensors}
        load_state(self.model, tensors, path)
        record = read_training_record(path)
        if record:
            self.prior_compute = {
                "episodes": int(record.get("episodes", 0)),
                "core_hours": float(record.get("core_hours", 0.0)),
                "runs": list(record.get("runs", [])),
            }

    def training_record(self) -> dict:
        """Cumulative compute behind the current weights (see `compute_record`)."""
        return compute_record(self.prior_compute, self.run_compute, self.step)

    def resume(self) -> bool:
        """Continue from the newest checkpoint in out_dir; False when there is none (the run starts
        at step 0, and the steps an earlier run logged before its first checkpoint are dropped)."""
        meta = load_training_checkpoint(self.out_dir, self.model, self.optimizer)
        if meta is None:
            if self.context.is_main:
                self.trim_log(0)
            return False
        self.step = int(meta["step"])
        self.hardness.load_state(meta.get("task_hardness", {}))
        compute = meta.get("compute")
        if isinstance(compute, dict):
            self.prior_compute = compute.get("prior", self.prior_compute)
            self.run_compute = compute.get("run", self.run_compute)
        if self.context.is_main:
            self.trim_log(self.step)
        return True

    def trim_log(self, step: int) -> None:
        """Drop log.jsonl records after `step` (steps a crashed run did past its last checkpoint,
        and a line cut off part-way), so the resumed run continues one consistent log."""
        path = self.out_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = [
            r
            for r in read_log_records(path)
            if isinstance(r.get("step"), int) and r["step"] <= step
        ]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept), overwrite=True)

    def train_step(self, step: int, batch: EpisodeBatch | None = None) -> float:
        """One optimisation step on `batch`, the episodes of `step` (a pure function of seed, step,
        rank and the task weights; sampled here when not given)."""
        config, context = self.config, self.context
        rate = learning_rate(
            step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)  # groups of older checkpoints: 1
        if batch is None:
            batch = StepBatches(
                self.sampler, config.episodes_per_step, context.rank, context.world_size
            )[step]
        images, maps, types, queries, targets = batch_to(batch, context.device)
        corrections, weights = self.simulated_corrections(
            step, images, maps, types, queries, targets
        )
        with autocast_for(context.device, config.mixed_precision):
            logits = self.network(images, maps, types, queries, corrections=corrections)
        losses = segmentation_losses(logits, targets, config.dice_weight, weights)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        episode_losses = losses.detach().reshape(len(batch.tasks), -1).mean(1).tolist()
        self.hardness.update(batch.tasks, episode_losses)
        return float(all_reduce_mean(loss.detach(), context))

    @torch.no_grad()
    def simulated_corrections(
        self,
        step: int,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        queries: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(E*Q, 2, R, R) correction maps of simulated clicks for a query-corrections model and
        (E*Q, R, R) loss weights of the pixels (None: all 1): 1 + correction_region_weight on the
        error regions of the first prediction that the clicks point at (both None for any other
        model, or with correction_fraction 0).

        config.correction_fraction of the queries get 1..max_corrections clicks
        (promptseg.train.simulated_corrections), over one round or, in half of the steps, two: the
        second round's clicks go where the prediction that saw the first round's is still wrong.
        The draws are a function of seed, step and rank; the predictions run without gradient."""
        config = self.config
        if not self.model.config.query_corrections or config.correction_fraction == 0:
            return None, None
        rng = np.random.default_rng([config.seed, step, self.context.rank, 18])
        counts = correction_counts(
            queries.shape[0], config.correction_fraction, config.max_corrections, rng
        )
        clicks: list[list] = [[] for _ in counts]
        truths = targets.cpu().numpy() > 0.5
        size = queries.shape[-1]
        first = None
        if counts.any():
            rounds = 2 if rng.random() < 0.5 else 1
            with autocast_for(self.context.device, config.mixed_precision):
                encoding = self.model.encode_prompts(images, maps, types)
                for share in round_counts(counts, rounds):
                    if not share.any():
                        continue
                    seen = maps_of(clicks, size, queries.device) if any(clicks) else None
                    predictions = (self.model.decode(queries, encoding, seen) > 0).cpu().numpy()
                    first = predictions if first is None else first
                    for index in np.flatnonzero(share):
                        clicks[index] += error_clicks(
                            predictions[index], truths[index], int(share[index]), rng
                        )
        weights = None
        if config.correction_region_weight > 0 and first is not None:
            regions = np.stack([clicked_regions(p, t, c) for p, t, c in zip(first, truths, clicks)])
            weights = 1.0 + config.correction_region_weight * torch.from_numpy(regions).float()
            weights = weights.to(queries.device)
        return maps_of(clicks, size, queries.device), weights

    def refresh_task_weights(self) -> None:
        """Task probabilities from the running losses (promptseg.train.task_balance); called at
        checkpoint boundaries only, so the episodes of a step depend on the last checkpoint
        alone."""
        if self.task_names and self.config.hardness_mix > 0:
            self.sampler.set_task_weights(
                self.hardness.weights(self.task_names, self.base_weights, self.config.hardness_mix)
            )

    def save(self) -> None:
        if self.context.is_main:
            info = {
                "train_config": self.config.to_dict(),
                "task_hardness": self.hardness.state(),
                "compute": {"prior": self.prior_compute, "run": self.run_compute},
            }
            save_training_checkpoint(self.out_dir, self.step, self.model, self.optimizer, info)
        barrier(self.context)

    def log(self, record: dict) -> None:
        if self.context.is_main:
            with open(self.out_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def run(self) -> dict:
        """Train until config.steps; checkpoints, validation and a final weights file in out_dir."""
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.context.is_main:
            sweep_stale_temporaries(
                self.out_dir
            )  # checkpoint temporaries of a run killed while writing
            (self.out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            disable=not self.progress,
            desc="train",
            unit="step",
        )
        episodes_done, started, last_loss = 0, time.perf_counter(), float("nan")
        cores = (torch.get_num_threads() + config.loader_workers) * self.context.world_size
        batches = StepBatches(
            self.sampler, config.episodes_per_step, self.context.rank, self.context.world_size
        )
        while self.step < config.steps:
            if self.step % config.checkpoint_every == 0 or episodes_done == 0:
                self.refresh_task_weights()
                segment_end = min(
                    config.steps,
                    (self.step // config.checkpoint_every + 1) * config.checkpoint_every,
                )
                segment = step_batches(batches, self.step, segment_end, config.loader_workers)
            step_started = time.perf_counter()
            last_loss = self.train_step(self.step, next(segment))
            self.step += 1
            episodes_done += config.episodes_per_step * self.context.world_size
            self.run_compute["episodes"] += config.episodes_per_step * self.context.world_size
            self.run_compute["core_hours"] += (time.perf_counter() - step_started) * cores / 3600.0
            rate = episodes_done / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", eps=f"{rate:.1f}")
            record = {
                "step": self.step,
                "loss": last_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "episodes_per_s": rate,
            }
            if self.val_tasks and (self.step % config.val_every == 0 or self.step == config.steps):
                scores = validation_dice(
                    self.model,
                    self.val_tasks,
                    config.val_shots,
                    config.val_episodes,
                    self.context.device,
                )
                record["val_dice"] = scores
                record["val_dice_mean"] = float(np.mean(list(scores.values())))
                bar.write(f"step {self.step}: validation Dice {record['val_dice_mean']:.1f}")
            self.log(record)
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                self.save()
        bar.close()
        if self.context.is_main:
            save_weights(
                self.model, self.out_dir / "final.safetensors", training=self.training_record()
            )
        return {"step": self.step, "loss": last_loss}


def train(
    config: TrainConfig,
    tasks: Sequence[ArrayTask],
    out_dir: str | Path,
    val_tasks: Sequence[ArrayTask] = (),
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    init: str | Path | None = None,
) -> dict:
    """Run (or resume) training, optionally warm-started from the weights file `init`; returns the
    final step and loss."""
    context = init_distributed(device)
    try:
        trainer = Trainer(config, tasks, out_dir, val_tasks, context, progress, init)
        if resume:
            trainer.resume()
        return trainer.run()
    finally:
        shutdown(context)
