"""Eager PyTorch backends: `torch` (SDPA attention) and `triton` (the fused Triton kernels)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from promptseg.engine.backends.base import InferenceBackend
from promptseg.kernels import triton_available
from promptseg.model import PromptEncoding, PromptSegNet
from promptseg.model.member_decoding import decode_feature_mean


class TorchBackend(InferenceBackend):
    """The model in eager mode with PyTorch's scaled_dot_product_attention (any device)."""

    name = "torch"
    attention = "sdpa"

    def __init__(self, model: PromptSegNet, device: torch.device) -> None:
        """Runs a copy of `model` of its own, on `device` in eval mode with this backend's
        attention: the caller's model is left where and as it was (two backends built on one model
        are independent)."""
        super().__init__(model, device)
        self.model = copy.deepcopy(model).to(device).eval().set_attention_kernel(self.attention)

    def encode(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> PromptEncoding:
        with torch.inference_mode():
            return self.model.encode_prompts(
                images.to(self.device), maps.to(self.device), types.to(self.device)
            )

    def decode(self, queries: torch.Tensor, state: PromptEncoding) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode(queries.to(self.device), state).float().cpu()

    def decodes_corrections(self) -> bool:
        return self.model.config.query_corrections

    def decode_corrected(
        self, queries: torch.Tensor, state: PromptEncoding, corrections: torch.Tensor
    ) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model.decode(queries.to(self.device), state, corrections.to(self.device))
            return logits.float().cpu()

    def select_prompts(
        self, state: PromptEncoding, keep: Sequence[int], num_prompts: int
    ) -> PromptEncoding | None:
        """A slice of the prompt tokens (exact: every token comes from one prompt); None with a
        prompt bottleneck, whose tokens mix the prompts, and for a "vit" model, whose prompt tokens
        attend to one another from the first layer on."""
        if self.config.bottleneck_tokens > 0 or self.config.architecture == "vit":
            return None
        return select_prompt_tokens(state, keep, num_prompts)

    def decode_members(
        self, queries: torch.Tensor, states: Sequence[PromptEncoding]
    ) -> torch.Tensor:
        """(B, C, R, R) against M states -> (M, B, R, R) float32 CPU logits, the query features
        computed once. One state alone decodes as `decode` does; states with the same prompt token
        counts decode as one batch of groups (a drop-one subset has fewer tokens than the full set,
        and padding them to one count would cost a masked attention for every member)."""
        if len(states) == 1:
            return self.decode(queries, states[0])[None]
        queries = queries.to(self.device)
        out: list[torch.Tensor | None] = [None] * len(states)
        with torch.inference_mode():
            features = self.model.query_features(queries)
            for indices in token_count_groups(states):
                logits = self.model.decode_members(
                    queries, stack_encodings([states[i] for i in indices]), features
                )
                for index, member in zip(indices, logits.float().cpu()):
                    out[index] = member
        return torch.stack(out)

    def decodes_means(self) -> bool:
        """True for the convolutional decoder (a "vit" model's decoder has no attended features)."""
        return self.config.architecture == "conv"

    def decode_mean(
        self, queries: torch.Tensor, states: Sequence[PromptEncoding]
    ) -> torch.Tensor | None:
        """(B, C, R, R) decoded once from the mean of the M members' attended features -> (B, R, R)
        float32 CPU logits (promptseg.model.member_decoding.decode_feature_mean); one state decodes
        as `decode`. None for a "vit" model, whose decoder has no such features."""
        if len(states) == 1:
            return self.decode(queries, states[0])
        if not self.decodes_means():
            return None
        queries = queries.to(self.device)
        with torch.inference_mode():
            groups = [
                stack_encodings([states[i] for i in indices])
                for indices in token_count_groups(states)
            ]
            return (
                decode_feature_mean(self.model, self.model.query_features(queries), queries, groups)
                .float()
                .cpu()
            )

    def decode_each(self, queries: torch.Tensor, states: Sequence[PromptEncoding]) -> torch.Tensor:
        """Query m of (M, C, R, R) against state m, one batch of M groups -> (M, R, R) float32 CPU
        logits."""
        with torch.inference_mode():
            return self.model.decode(queries.to(self.device), stack_encodings(states)).float().cpu()


def select_prompt_tokens(
    encoding: PromptEncoding, keep: Sequence[int], num_prompts: int
) -> PromptEncoding:
    """The encoding of prompts `keep` (indices into the `num_prompts` of a one-group encoding
    without a bottleneck, whose Nk keys are prompt-major: Nk / num_prompts tokens per prompt)."""
    keys, values = [], []
    for stage_keys, stage_values in zip(encoding.keys, encoding.values):
        per_prompt = stage_keys[0].shape[2] // num_prompts
        index = torch.cat([torch.arange(p * per_prompt, (p + 1) * per_prompt) for p in keep]).to(
            stage_keys[0].device
        )
        keys.append([k.index_select(2, index) for k in stage_keys])
        values.append([v.index_select(2, index) for v in stage_values])
    return PromptEncoding(keys, values, [None] * len(keys))


def token_count_groups(encodings: Sequence[PromptEncoding]) -> list[list[int]]:
    """Indices of the encodings grouped by their per-stage prompt token counts, in first-seen
    order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, encoding in enumerate(encodings):
        groups.setdefault(tuple(stage[0].shape[2] for stage in encoding.keys), []).append(index)
    return list(groups.values())


def stack_encodings(encodings: Sequence[PromptEncoding]) -> PromptEncoding:
    """M one-group encodings -> one encoding of M groups; stages whose key counts differ are padded
    with zeros past each group's own count, which key_lengths (M,) records."""
    if len(encodings) == 1:
        return encodings[0]
    keys, values, lengths = [], [], []
    for stage in range(len(encodings[0].keys)):
        counts = [e.keys[stage][0].shape[2] for e in encodings]
        top = max(counts)
        entries = range(len(encodings[0].keys[stage]))
        keys.append(
            [torch.cat([pad_tokens(e.keys[stage][i], top) for e in encodings]) for i in entries]
        )
        values.append(
            [torch.cat([pad_tokens(e.values[stage][i], top) for e in encodings]) for i in entries]
        )
        device = encodings[0].keys[stage][0].device
        lengths.append(
            None if len(set(counts)) == 1 else torch.tensor(counts, dtype=torch.long, device=device)
        )
    return PromptEncoding(keys, values, lengths)


class TritonBackend(TorchBackend):
    """Eager model whose attention runs the fused Triton kernels (CUDA; the interpreter on CPU)."""

    name = "triton"
    attention = "triton"

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        """Whether the kernels run on `device`: CUDA devices, or the CPU under
        TRITON_INTERPRET=1."""
        return triton_available(device)


class ReferenceBackend(TorchBackend):
    """Eager model with the plain PyTorch reference attention (for checking the others)."""

    name = "reference"
    attention = "reference"


def pad_tokens(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """(G, H, n, D) -> (G, H, count, D), zeros past n."""
    return F.pad(tensor, (0, 0, 0, count - tensor.shape[2])) if tensor.shape[2] < count else tensor
