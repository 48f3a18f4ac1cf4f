"""Test-time ensembles over prompt subsets and flips, calibrated on the prompts they leave out.

An ensemble of N members (`plan_members`) averages the predictions of:

- member 0: the prompt set as given (so an ensemble of one is the plain prediction);
- for K >= 2, the K drop-one subsets (each leaves one prompt out), in a seeded random order;
- then the same subsets with the prompts and queries flipped left-right, up-down and both
  (a single prompt thus has 4 members, two prompts 12, three or more at least 16).

The order of the prompts is no member: attention over prompt tokens does not depend on it.

Every drop-one member also predicts the prompt it left out, whose mask is known: those
leave-one-out predictions fix one logit shift (`calibration_bias`) of the decision threshold. It
corrects a model that is too shy or too eager on a task (on membranes, thin structures, the
shipped weights stay below 0.5): the mask is the members' mean probability above
`decision_threshold(t, shift)` = sigmoid(logit(t) - shift) instead of above t. The probabilities
themselves stay the members' unshifted mean, which is better calibrated (shifting them moves
every pixel's probability, and the expected calibration error with it), and the same held-out
predictions fit one temperature (`calibration_temperature`, least cross-entropy) that divides
every member's logits before they are averaged; the shift, fitted on the raw logits, is divided
by it too (`Ensemble.shift`), so the mask does not change. With no drop-one member (N = 1 or
K = 1), no mask prompt left out, or `shift=False` (`--ensemble-shift off`), the shift is 0 and
the temperature 1: the members' plain average.

The ensemble's prediction (`mean_probabilities`) averages the members of one flip in feature
space: their attended features after the attention stages are averaged and decoded once
(`InferenceBackend.decode_mean`; on the held-out protocol this scores as averaging the members'
probabilities, which the members' variance and candidates still need: `member_probabilities`).
Backends without decode_mean average the members' probabilities.

Costs: a prompt subset's encoding is a slice of the full set's (prompt tokens are per prompt), so
each flip of the prompt set is encoded once (`InferenceBackend.select_prompts`; backends that
cannot slice encode each subset once). The members of one flip share one computation of the
query features (`InferenceBackend.decode_mean`, `InferenceBackend.decode_members`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from promptseg.engine.backends.base import InferenceBackend, PromptState
from promptseg.metrics import hard_dice
from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.propagation import probability_logit

MAX_ENSEMBLE = 16
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # none, left-right, up-down, both
BIAS_GRID = torch.linspace(-4.0, 4.0, 33)  # logit shifts tried by calibration_bias, 0.25 apart
TEMPERATURE_GRID = torch.logspace(
    -2.0, 2.0, 33, base=2.0
)  # tried by calibration_temperature, 1/4..4


@dataclass(frozen=True)
class Member:
    """One ensemble member: the prompts it keeps (indices into the K prompts), the flip dims of its
    prompts and queries, and the prompt it leaves out (None for the full set)."""

    keep: tuple[int, ...]
    flip: tuple[int, ...]
    held: int | None


def plan_members(num_prompts: int, count: int, seed: int = 0) -> list[Member]:
    """The first `count` members for K = num_prompts prompts (fewer when K has fewer; see the
    module docstring). The order of the drop-one subsets is drawn from `seed`."""
    if not 1 <= count <= MAX_ENSEMBLE:
        raise ValueError(f"ensemble members must lie in 1..{MAX_ENSEMBLE}, got {count}")
    everything = tuple(range(num_prompts))
    subsets: list[tuple[tuple[int, ...], int | None]] = [(everything, None)]
    if num_prompts >= 2:
        for held in np.random.default_rng(seed).permutation(num_prompts).tolist():
            subsets.append((tuple(i for i in everything if i != held), held))
    members = [Member(keep, flip, held) for flip in FLIPS for keep, held in subsets]
    return members[:count]


def flipped(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x flipped along `dims` (x itself for no dims); flipping twice restores it."""
    return x.flip(dims) if dims else x


def decision_threshold(threshold: float, shift: float) -> float:
    """The probability threshold equivalent to `threshold` on logits shifted by `shift`:
    sigmoid(logit(threshold) - shift), so that p > it exactly when logit(p) + shift >
    logit(threshold)."""
    return 1.0 / (1.0 + math.exp(shift - math.log(threshold / (1.0 - threshold))))


def calibration_bias(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """The logit shift b of BIAS_GRID whose masks logits + b > 0 score the best mean hard Dice
    against masks; logits, masks (n, R, R). Ties go to the smallest |b|; 0.0 when n == 0."""
    if logits.shape[0] == 0:
        return 0.0
    targets = masks > 0.5
    scores = torch.stack([hard_dice(logits.float() + b > 0, targets).mean() for b in BIAS_GRID])
    best = torch.nonzero(scores >= scores.max() - 1e-6).flatten()
    return float(BIAS_GRID[best][BIAS_GRID[best].abs().argmin()])


def calibration_temperature(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """The temperature T of TEMPERATURE_GRID whose probabilities sigmoid(logits / T) have the least
    mean binary cross-entropy against masks; logits, masks (n, R, R). Ties go to the T closest to 1
    (in log scale); 1.0 when n == 0."""
    if logits.shape[0] == 0:
        return 1.0
    targets = (masks > 0.5).float()
    losses = torch.stack(
        [F.binary_cross_entropy_with_logits(logits.float() / t, targets) for t in TEMPERATURE_GRID]
    )
    best = torch.nonzero(losses <= losses.min() + 1e-7).flatten()
    return float(TEMPERATURE_GRID[best][TEMPERATURE_GRID[best].log().abs().argmin()])


@dataclass
class Ensemble:
    """An encoded ensemble: its members, each member's prompt state, the logit shift `bias` of its
    decision threshold on the members' raw logits (`calibration_bias`) and the temperature of its
    probabilities (`calibration_temperature`), both fitted on the prompts the members leave out."""

    members: tuple[Member, ...]
    states: tuple[PromptState, ...]
    bias: float
    temperature: float = 1.0

    @property
    def shift(self) -> float:
        """The shift in the logits of the reported probabilities (the members' logits /
        temperature): logit / T + bias / T > 0 exactly where logit + bias > 0."""
        return self.bias / self.temperature

    def nbytes(self) -> int:
        """Bytes of the distinct prompt states (subset slices of one encoding count on their
        own)."""
        return sum({id(s): s.nbytes() for s in self.states}.values())


def build_ensemble(
    backend: InferenceBackend,
    images: torch.Tensor,
    maps: torch.Tensor,
    types: torch.Tensor,
    members: Sequence[Member],
    encode: Callable[[tuple[int, ...], tuple[int, ...]], PromptState],
    shift: bool = True,
) -> Ensemble:
    """Prompt states of every member and the leave-one-out shift of the decision threshold and
    temperature (0.0 and 1.0, without decoding the held-out prompts, when `shift` is False).

    images (1, K, C, R, R), maps (1, K, R, R), types (1, K) as prepared for the backend;
    encode(flip, keep) encodes the prompts `keep` flipped by `flip` (the caller caches it). A
    subset's state is a slice of its flip's full encoding where the backend can slice
    (`select_prompts`).
    """
    num_prompts = images.shape[1]
    everything = tuple(range(num_prompts))
    states = []
    for member in members:
        state = None
        if member.keep != everything:
            state = backend.select_prompts(
                encode(member.flip, everything), member.keep, num_prompts
            )
        states.append(state if state is not None else encode(member.flip, member.keep))
    held = [
        (m, s)
        for m, s in zip(members, states)
        if shift and m.held is not None and int(types[0, m.held]) == PROMPT_TYPES["mask"]
    ]
    if not held:
        return Ensemble(tuple(members), tuple(states), 0.0)
    queries = torch.stack([flipped(images[0, m.held], m.flip) for m, _ in held])
    logits = backend.decode_each(queries, [s for _, s in held])
    logits = torch.stack([flipped(logit, m.flip) for logit, (m, _) in zip(logits, held)])
    targets = torch.stack([maps[0, m.held] for m, _ in held])
    return Ensemble(
        tuple(members),
        tuple(states),
        calibration_bias(logits, targets),
        calibration_temperature(logits, targets),
    )


def member_probabilities(
    ensemble: Ensemble,
    queries: torch.Tensor,
    decode_members: Callable[[torch.Tensor, list[PromptState]], torch.Tensor],
) -> torch.Tensor:
    """Probabilities (M, B, R, R) float32 of every member for queries (B, C, R, R): sigmoid of the
    logits over the ensemble's temperature, unshifted (its shift moves the decision threshold).

    decode_members(view (B, C, R, R), states) -> (m, B, R, R) logits runs the members of one flip
    together (InferenceBackend.decode_members, or a wrapper of it that splits the batch)."""
    out: list[torch.Tensor | None] = [None] * len(ensemble.members)
    for flip in dict.fromkeys(m.flip for m in ensemble.members):
        indices = [i for i, m in enumerate(ensemble.members) if m.flip == flip]
        logits = decode_members(flipped(queries, flip), [ensemble.states[i] for i in indices])
        for index, member_logits in zip(indices, flipped(logits.float(), flip)):
            out[index] = torch.sigmoid(member_logits / ensemble.temperature)
    return torch.stack(out)


def mean_probabilities(
    ensemble: Ensemble,
    queries: torch.Tensor,
    decode_mean: Callable[[torch.Tensor, list[PromptState]], torch.Tensor | None],
    decode_members: Callable[[torch.Tensor, list[PromptState]], torch.Tensor],
) -> torch.Tensor:
    """The ensemble's probabilities (B, R, R) float32 for queries (B, C, R, R): for each flip, one
    decode of its members' mean attended features (decode_mean(view, states) -> (B, R, R) logits,
    InferenceBackend.decode_mean), sigmoid(logit / T), unflipped; the flips weighted by their
    member counts. Where decode_mean gives None, that flip's members' probabilities are averaged
    (`member_probabilities`)."""
    total = torch.zeros(())
    for flip in dict.fromkeys(m.flip for m in ensemble.members):
        states = [s for m, s in zip(ensemble.members, ensemble.states) if m.flip == flip]
        view = flipped(queries, flip)
        logits = decode_mean(view, states)
        if logits is None:
            logits = decode_members(view, states).float()
            part = torch.sigmoid(logits / ensemble.temperature).sum(0)
        else:
            part = torch.sigmoid(logits.float() / ensemble.temperature) * len(states)
        total = total + flipped(part, flip)
    return total / len(ensemble.members)


def mean_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """Member probabilities (M, B, R, R) -> the logit (B, R, R) of their mean, clamped to
    logit(1e-6)."""
    return probability_logit(probabilities.mean(0), eps=1e-6)
