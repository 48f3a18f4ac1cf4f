"""PromptSegNet: the PromptSeg model, with the whole forward pass of its convolutional design here.

One forward pass, read top to bottom in this file (docs/design.md section 1):
1. `encode_prompts`: the shared encoder (encoder.py) sees every prompt image twice, once alone (as a
   query would be seen, giving the keys) and once with its prompt map (giving the values). At each
   attention stage a PromptTokenizer turns them into prompt tokens, optionally distilled by an
   information bottleneck, and every attention block and label propagation head projects them to
   its keys and values: the PromptEncoding, which depends on the prompts alone and is cached.
2. `decode`: the query is encoded by the same encoder; at each attention stage its tokens first
   receive the prompt labels propagated to them (propagation.py), then attend to the prompt tokens
   (attention.py, through promptseg.kernels.cross_attention); the upsampling decoder brings the
   features back to full resolution and the propagated prior is added in logit space.
The blocks are primitives beside this file (layers.py, attention.py, propagation.py, encoder.py).
The paper's ViT design (vit.py) is the same interface, chosen by `ModelConfig.architecture`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptseg.kernels import ATTENTION_KERNELS, check_kernel_device
from promptseg.model.attention import Attention, PromptBottleneck, QueryPromptBlock
from promptseg.model.config import ModelConfig
from promptseg.model.encoder import SharedEncoder
from promptseg.model.encoding import PromptEncoding
from promptseg.model.layers import PromptTokenizer, UpBlock, sincos_position_encoding
from promptseg.model.member_decoding import decode_member_groups
from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.propagation import LabelPropagation, probability_logit, propagation_labels
from promptseg.model.query_corrections import CHANNELS as CORRECTION_CHANNELS


class PromptTokenizers(nn.Module):
    """The prompt side's own parameters: a PromptTokenizer per attention stage and, with an
    information bottleneck (ModelConfig.bottleneck_tokens > 0), a PromptBottleneck per stage."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tokenizers = nn.ModuleList(
            PromptTokenizer(config.widths[s]) for s in config.attention_stages
        )
        self.bottlenecks = (
            nn.ModuleList(
                PromptBottleneck(
                    config.widths[s], config.head_dim, config.bottleneck_tokens, config.mlp_ratio
                )
                for s in config.attention_stages
            )
            if config.bottleneck_tokens > 0
            else None
        )


class UpsamplingDecoder(nn.Module):
    """The query side's own parameters: the upsampling path, the 1x1 output head and, with label
    propagation, the prior embeddings (one 1x1 convolution per stage) and the prior's logit gain;
    with query corrections, `correction_fuse`, a bias-free 3x3 convolution of the correction maps
    that starts at zero, added to the full-resolution block's fused features (the corrections'
    short path to the output, beside the encoder's correction stem).

    forward: encoder features of every stage [(B, widths[i], h_i, w_i)] after attention, the
    queries (B, C, R, R) and optional corrections (B, 2, R, R) -> logits (B, R, R) before the prior
    is added.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = config.widths
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        full_width = max(widths[0] // 2, 8)
        self.full_resolution = UpBlock(widths[0], config.in_channels, full_width)
        self.head = nn.Conv2d(full_width, 1, 1)
        self.correction_fuse = None
        if config.query_corrections:
            self.correction_fuse = nn.Conv2d(
                CORRECTION_CHANNELS, full_width, 3, padding=1, bias=False
            )
            nn.init.zeros_(self.correction_fuse.weight)
        if config.label_propagation:
            heads = [config.widths[s] // config.head_dim for s in config.attention_stages]
            self.prior_embeddings = nn.ModuleList(
                nn.Conv2d(h, config.widths[s], 1) for h, s in zip(heads, config.attention_stages)
            )
            self.prior_gain = nn.Parameter(torch.tensor(1.0))

    def forward(
        self,
        features: list[torch.Tensor],
        queries: torch.Tensor,
        corrections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        if corrections is None:
            x = self.full_resolution(x, queries * 2.0 - 1.0)
        else:
            x = self.full_resolution(
                x, queries * 2.0 - 1.0, self.correction_fuse(corrections.to(x.dtype))
            )
        return self.head(x).squeeze(1)


class PromptSegNet(nn.Module):
    """Universal segmentation by visual prompts.

    `encode_prompts` depends only on the prompts and its PromptEncoding is reused by `decode` for
    any number of queries; `forward` is the two in sequence. PromptSegNet(config) builds the
    architecture the config names: this convolutional design, or PromptSegViT (vit.py).
    """

    def __new__(cls, config: ModelConfig | None = None) -> PromptSegNet:
        if cls is PromptSegNet and config is not None and config.architecture == "vit":
            from promptseg.model.vit import PromptSegViT  # vit.py builds on this module

            return super().__new__(PromptSegViT)
        return super().__new__(cls)

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        self.encoder = SharedEncoder(config)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                QueryPromptBlock(config.widths[s], config.head_dim, config.mlp_ratio)
                for _ in range(config.attention_depth)
            )
            for s in config.attention_stages
        )
        self.propagations = (
            nn.ModuleList(
                LabelPropagation(config.widths[s], config.head_dim) for s in config.attention_stages
            )
            if config.label_propagation
            else None
        )
        self.prompt_encoder = PromptTokenizers(config)
        self.query_decoder = UpsamplingDecoder(config)
        self.set_attention_kernel("sdpa")

    @property
    def attention_kernel(self) -> str:
        return self._attention_kernel

    def set_attention_kernel(self, kernel: str) -> PromptSegNet:
        """Route every attention call through `kernel` (reference, sdpa or triton): sets the
        `kernel` field of every module that attends (Attention, LabelPropagation).

        Raises PromptSegError (one line) when the kernel cannot run where the model's parameters
        live (triton on a CPU model without TRITON_INTERPRET=1, or on a CUDA model under it): move
        the model to its device first.
        """
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}"
            )
        check_kernel_device(kernel, next(self.parameters()).device)
        self._attention_kernel = kernel
        for module in self.modules():
            if isinstance(module, (Attention, LabelPropagation)):
                module.kernel = kernel
        return self

    def check_prompts(self, images: torch.Tensor, maps: torch.Tensor, types: torch.Tensor) -> None:
        """Raise ValueError unless images (G, K, C, R, R), maps (G, K, R, R), types (G, K) agree."""
        if images.dim() != 5 or images.shape[2] != self.config.in_channels:
            raise ValueError(
                f"prompt images must be (G, K, {self.config.in_channels}, R, R), got "
                f"{tuple(images.shape)}"
            )
        if maps.shape != images.shape[:2] + images.shape[3:] or types.shape != images.shape[:2]:
            raise ValueError(
                f"prompt maps {tuple(maps.shape)} / types {tuple(types.shape)} do not match images"
            )
        if not 1 <= images.shape[1] <= self.config.max_prompts:
            raise ValueError(
                f"between 1 and {self.config.max_prompts} prompts are supported, got "
                f"{images.shape[1]}"
            )

    def encode_prompts(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> PromptEncoding:
        """images (G, K, C, R, R), maps (G, K, R, R), types (G, K) long; num_prompts (G,) marks
        groups padded past their own prompt count. Returns the cacheable PromptEncoding."""
        self.check_prompts(images, maps, types)
        return self.prompt_encoding(images, maps, types, num_prompts)

    def prompt_encoding(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
    ) -> PromptEncoding:
        """`encode_prompts` without its shape checks (the traced export graphs call this).

        PromptEncoding: per attention stage, each block's (keys, values) (G, H, K*h*w, D) of the
        prompt tokens (or (G, H, M, D) of the M bottleneck latents), then the label propagation
        head's pair."""
        groups, shots = images.shape[:2]
        flat_images = images.flatten(0, 1)
        flat_maps = maps.flatten(0, 1)
        query_types = torch.full_like(types.flatten(), PROMPT_TYPES["query"])
        both = self.encoder(
            torch.cat([flat_images, flat_images]),
            torch.cat([torch.zeros_like(flat_maps), flat_maps]),
            torch.cat([query_types, types.flatten()]),
        )
        tokens_side = self.prompt_encoder
        all_keys, all_values, all_lengths = [], [], []
        for index, stage in enumerate(self.config.attention_stages):
            # Slices rather than chunk(2): torch.export cannot prove chunk's output count constant
            # in K and would specialise the exported graphs to the example K.
            count = flat_images.shape[0]
            key_features, value_features = both[stage][:count], both[stage][count:]
            _, c, h, w = key_features.shape
            pos = sincos_position_encoding(h, w, c, key_features.device, key_features.dtype)
            keys, values = tokens_side.tokenizers[index](
                key_features, value_features, flat_maps, pos, groups
            )
            tokens_per_prompt = keys.shape[1] // shots
            lengths = (
                None if num_prompts is None else num_prompts.to(keys.device) * tokens_per_prompt
            )
            if tokens_side.bottlenecks is not None:
                keys = values = tokens_side.bottlenecks[index](keys, values, lengths)
                lengths = None
            pairs = [block.prompt_keys(keys, values) for block in self.blocks[index]]
            if self.propagations is not None:
                tokens = key_features.flatten(2).transpose(1, 2)
                labels = propagation_labels(
                    flat_maps.to(tokens.dtype), types.flatten(), (h, w), self.config.sparse_unknown
                )
                pairs.append(self.propagations[index].prompt_keys(tokens, pos, labels, groups))
            all_keys.append([k for k, _ in pairs])
            all_values.append([v for _, v in pairs])
            all_lengths.append(lengths)
        return PromptEncoding(all_keys, all_values, all_lengths)

    def decode(
        self,
        queries: torch.Tensor,
        prompts: PromptEncoding,
        corrections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries (B, C, R, R) with B a multiple of G -> logits (B, R, R); query b uses group b //
        (B // G). corrections (B, 2, R, R): the clicks and scribbles on each query
        (promptseg.model.query_corrections; a query_corrections model only)."""
        if queries.shape[0] % prompts.groups != 0:
            raise ValueError(
                f"{queries.shape[0]} queries cannot be split over {prompts.groups} prompt sets"
            )
        return self.decode_features(
            self.query_features(queries, corrections), queries, prompts, corrections
        )

    def query_features(
        self, queries: torch.Tensor, corrections: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """queries (B, C, R, R) and optional corrections (B, 2, R, R) -> the shared encoder's
        features of every stage, (B, widths[i], h_i, w_i).

        They do not depend on the prompts, so several prompt sets can decode one computation of
        them."""
        empty = torch.zeros_like(queries[:, 0])
        types = torch.full(
            (queries.shape[0],), PROMPT_TYPES["query"], dtype=torch.long, device=queries.device
        )
        if corrections is not None and corrections.shape != (
            queries.shape[0],
            2,
            *queries.shape[2:],
        ):
            raise ValueError(
                f"corrections must be (B, 2, R, R) for queries {tuple(queries.shape)}, got "
                f"{tuple(corrections.shape)}"
            )
        return self.encoder(queries, empty, types, corrections)

    def decode_features(
        self,
        features: list[torch.Tensor],
        queries: torch.Tensor,
        prompts: PromptEncoding,
        corrections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`query_features` of queries (B, C, R, R), B a multiple of the G prompt groups -> logits
        (B, R, R); corrections (B, 2, R, R), those the features were computed with, also reach the
        decoder's full-resolution block.

        With label propagation, each attention stage first propagates the prompt labels to the query
        tokens (H maps per stage, embedded into the stage features by a 1x1 convolution), and the
        head-averaged map of the first attention stage, upsampled to R, is added in logit space to
        the output with a learned gain: the network starts from label transfer and learns to refine
        it.
        """
        features = list(features)
        priors = []
        for index, stage in enumerate(self.config.attention_stages):
            features[stage], prior = self.attend(features[stage], index, prompts)
            priors.append(prior)
        logits = self.query_decoder(features, queries, corrections)
        if self.propagations is not None:
            logits = self.add_prior(logits, priors[0].mean(dim=1, keepdim=True))
        return logits

    def add_prior(self, logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """logits (B, R, R) plus the learned gain times the logit of `prior` (B, 1, h, w), the
        head-averaged label probabilities propagated at the first attention stage, upsampled to
        R."""
        prior = F.interpolate(prior, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return logits + self.query_decoder.prior_gain * probability_logit(prior.squeeze(1))

    def attend(
        self, features: torch.Tensor, stage_index: int, prompts: PromptEncoding
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query features (B, C, h, w) attend to the prompt tokens of one stage.

        Returns the new features (B, C, h, w) and, with label propagation, the propagated label
        probabilities (B, H, h, w) (else None).
        """
        b, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        pos = sincos_position_encoding(h, w, c, features.device, features.dtype)
        lengths = prompts.key_lengths[stage_index]
        blocks = self.blocks[stage_index]
        prior = None
        if self.propagations is not None:
            k, v = prompts.keys[stage_index][len(blocks)], prompts.values[stage_index][len(blocks)]
            prior = self.propagations[stage_index](tokens, pos, k, v, lengths).reshape(b, -1, h, w)
            embedded = self.query_decoder.prior_embeddings[stage_index](prior * 2.0 - 1.0)
            tokens = tokens + embedded.flatten(2).transpose(1, 2)
        for block, k, v in zip(blocks, prompts.keys[stage_index], prompts.values[stage_index]):
            tokens = block(tokens, pos, k, v, lengths)
        return tokens.transpose(1, 2).reshape(b, c, h, w), prior

    def decode_members(
        self,
        queries: torch.Tensor,
        prompts: PromptEncoding,
        features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Every query against every one of the G prompt groups (ensemble members), in one batch:
        queries (B, C, R, R) -> logits (G, B, R, R). The query encoder runs once for the B queries
        (or not at all when their `query_features` are given), and the convolutional decoder shares
        the skip connections' convolutions between the members (promptseg.model.member_decoding)."""
        features = self.query_features(queries) if features is None else features
        return decode_member_groups(self, features, queries, prompts)

    def forward(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        types: torch.Tensor,
        queries: torch.Tensor,
        num_prompts: torch.Tensor | None = None,
        corrections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt sets (G, K, ...) and queries (B, C, R, R), with optional corrections (B, 2, R, R)
        -> logits (B, R, R)."""
        return self.decode(
            queries, self.encode_prompts(images, maps, types, num_prompts), corrections
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
