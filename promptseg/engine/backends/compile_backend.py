"""`compile` backend: the query decoder through torch.compile (Inductor; CUDA graphs on GPU).

torch.compile with static shapes compiles (and on CUDA records a graph) once per input shape, and
past Dynamo's recompile limit it would silently fall back to eager. So the decoder only ever sees
bucketed shapes: query batches padded to the next power of two, and prompt tokens padded to the
next power of two of the prompt count K, the padding masked through `key_lengths`. The shapes it
compiled are counted in `compiled_shapes`; hitting the limit raises instead of falling back.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import torch

from promptseg.engine.backends.base import InferenceBackend
from promptseg.engine.backends.torch_backends import TorchBackend, pad_tokens
from promptseg.kernels import default_kernel
from promptseg.model import PromptEncoding, PromptSegNet

# Compiled shapes allowed before torch.compile raises: (batch buckets) x (prompt-count buckets) of
# every realistic use (batches up to 2**9, K up to 64) with room to spare.
MAX_COMPILED_SHAPES = 96


def size_bucket(size: int) -> int:
    """The next power of two at or above `size` (at least 1)."""
    return 1 << max(int(size) - 1, 0).bit_length()


def pad_prompt_tokens(encoding: PromptEncoding, prompts: int) -> PromptEncoding:
    """A one-group encoding of K = `prompts` prompts -> the same encoding with each stage's keys and
    values (1, H, K*n, D) zero-padded to (1, H, bucket(K)*n, D) and key_lengths [K*n], so that any K
    of one bucket gives the decoder the same shapes (padding keys are masked: the logits are
    unchanged). Encodings whose token counts are not K times a per-prompt count (a prompt
    bottleneck) or that already carry key_lengths are returned as they are.
    """
    counts = [stage[0].shape[2] for stage in encoding.keys]
    if any(n is not None for n in encoding.key_lengths) or any(
        tokens % prompts for tokens in counts
    ):
        return encoding
    keys, values, lengths = [], [], []
    for stage_keys, stage_values, tokens in zip(encoding.keys, encoding.values, counts):
        padded = size_bucket(prompts) * (tokens // prompts)
        keys.append([pad_tokens(t, padded) for t in stage_keys])
        values.append([pad_tokens(t, padded) for t in stage_values])
        lengths.append(torch.tensor([tokens], device=stage_keys[0].device))
    return PromptEncoding(keys, values, lengths)


class CompiledBackend(TorchBackend):
    """Eager prompt encoding (once per prompt set) and a compiled query decoder (every batch).

    On CUDA the decoder is compiled with mode="reduce-overhead", which replays CUDA graphs, and its
    attention runs the Triton kernels; on the CPU Inductor generates C++ and needs a compiler.
    The first batch of each new (batch bucket, prompt-token count) shape pays the compilation;
    `compiled_shapes` holds those seen so far.
    """

    name = "compile"

    def __init__(self, model: PromptSegNet, device: torch.device) -> None:
        self.attention = default_kernel(device)
        super().__init__(model, device)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.compiled_decoder = torch.compile(self.model.decode, mode=mode, dynamic=False)
        self.compiled_shapes: set[tuple[int, tuple[int, ...]]] = set()

    @classmethod
    def availability(cls, device: torch.device) -> tuple[bool, str]:
        if device.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return (
                False,
                "compile backend on the CPU needs a C++ compiler (c++ or g++) on PATH for Inductor",
            )
        return True, ""

    def encode(
        self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor
    ) -> PromptEncoding:
        """(1, K, C, R, R), (1, K, R, R), (1, K) -> the encoding padded to the bucket of K
        (`pad_prompt_tokens`)."""
        return pad_prompt_tokens(super().encode(images, maps, types), images.shape[1])

    def select_prompts(self, state: PromptEncoding, keep: Sequence[int], num_prompts: int) -> None:
        """None: a padded state is not cut by prompt (the subset is encoded, and padded, on its
        own)."""
        return

    def decode(self, queries: torch.Tensor, state: PromptEncoding) -> torch.Tensor:
        """(B, C, R, R) -> (B, R, R) float32 CPU logits, the batch padded to its bucket with copies
        of its last query (dropped from the result)."""
        batch = queries.shape[0]
        padded = torch.cat([queries, queries[-1:].expand(size_bucket(batch) - batch, -1, -1, -1)])
        self.compiled_shapes.add(
            (padded.shape[0], tuple(stage[0].shape[2] for stage in state.keys))
        )
        with (
            torch.inference_mode(),
            torch._dynamo.config.patch(
                recompile_limit=MAX_COMPILED_SHAPES, fail_on_recompile_limit_hit=True
            ),
        ):
            logits = self.compiled_decoder(padded.to(self.device), state)
        return logits[:batch].float().cpu()

    # Ensemble members and per-query states go through `decode`, one bucketed shape at a time (a
    # padded state's key lengths would be lost in a feature mean: the members' probabilities are
    # averaged).
    decode_members = InferenceBackend.decode_members
    decode_each = InferenceBackend.decode_each
    decodes_means = InferenceBackend.decodes_means
    decode_mean = InferenceBackend.decode_mean
