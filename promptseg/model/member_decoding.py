"""Decoding several prompt groups (ensemble members) against the same queries, sharing what the
members have in common.

For the convolutional model (PromptSegNet, model/network.py) only the attention stages and what
follows them depend on the prompts. The query encoder runs once for the B queries
(`PromptSegNet.query_features`), and in every upsampling block the skip connection's share of the
fusing convolution is computed once per query and added to every member's:
conv(cat(x, skip)) = conv_x(x) + conv_skip(skip), as the convolution is linear (the same sums in
another order, so equal to float rounding).

`decode_feature_mean` is the ensemble's cheaper mean: the members' attended features are averaged
and the upsampling path runs once, instead of once per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from promptseg.model.encoding import PromptEncoding
from promptseg.model.layers import UpBlock

if TYPE_CHECKING:  # network.py imports this module
    from promptseg.model.network import PromptSegNet


def shared_skip_up(up: UpBlock, x: torch.Tensor, skip: torch.Tensor, groups: int) -> torch.Tensor:
    """up(x, skip repeated `groups` times) for x (G * B, C_in, h, w), member-major, and skip
    (B, C_skip, 2h, 2w) shared by the G members -> (G * B, C_out, 2h, 2w)."""
    conv = up.fuse[0]
    x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    width = x.shape[1]
    member = F.conv2d(x, conv.weight[:, :width], conv.bias, conv.stride, conv.padding)
    shared = F.conv2d(skip, conv.weight[:, width:], None, conv.stride, conv.padding)
    fused = (member.unflatten(0, (groups, skip.shape[0])) + shared).flatten(0, 1)
    for layer in list(up.fuse)[1:]:
        fused = layer(fused)
    return up.refine(fused)


def decode_member_groups(
    model: PromptSegNet,
    features: list[torch.Tensor],
    queries: torch.Tensor,
    prompts: PromptEncoding,
) -> torch.Tensor:
    """`model.query_features(queries)` (B-sized entries) and queries (B, C, R, R) against each of
    the G groups of `prompts` -> logits (G, B, R, R), as model.decode_features of the features
    and queries repeated G times would give (to float rounding)."""
    groups, count = prompts.groups, queries.shape[0]
    attended: dict[int, torch.Tensor] = {}
    priors = []
    for index, stage in enumerate(model.config.attention_stages):
        attended[stage], prior = model.attend(
            features[stage].repeat(groups, 1, 1, 1), index, prompts
        )
        priors.append(prior)
    top = len(features) - 1
    x = attended[top] if top in attended else features[top].repeat(groups, 1, 1, 1)
    for level, up in zip(reversed(range(top)), model.query_decoder.ups):
        if level in attended:  # an attention stage: its skip features are the member's own
            x = up(x, attended[level])
        else:  # a query feature, the same for every member
            x = shared_skip_up(up, x, features[level], groups)
    x = shared_skip_up(model.query_decoder.full_resolution, x, queries * 2.0 - 1.0, groups)
    logits = model.query_decoder.head(x).squeeze(1)
    if model.propagations is not None:
        logits = model.add_prior(logits, priors[0].mean(dim=1, keepdim=True))
    return logits.reshape(groups, count, *logits.shape[1:])


def decode_feature_mean(
    model: PromptSegNet,
    features: list[torch.Tensor],
    queries: torch.Tensor,
    groups: Sequence[PromptEncoding],
) -> torch.Tensor:
    """One decode of the members' mean: `model.query_features(queries)` and queries (B, C, R, R)
    attend to every group of every encoding in `groups` (M groups in all); the attended features
    of each attention stage and the label-propagation priors are averaged over the M members, and
    the upsampling path runs once -> logits (B, R, R). With one member this is
    model.decode_features.
    """
    count = queries.shape[0]
    members = sum(p.groups for p in groups)
    sums: dict[int, torch.Tensor] = {}
    prior_sum = None
    for prompts in groups:
        for index, stage in enumerate(model.config.attention_stages):
            repeated = features[stage].repeat(prompts.groups, 1, 1, 1)
            attended, prior = model.attend(repeated, index, prompts)
            total = attended.unflatten(0, (prompts.groups, count)).sum(0)
            sums[stage] = total if stage not in sums else sums[stage] + total
            if index == 0 and prior is not None:
                prior = prior.mean(dim=1, keepdim=True).unflatten(0, (prompts.groups, count)).sum(0)
                prior_sum = prior if prior_sum is None else prior_sum + prior
    averaged = list(features)
    for stage, total in sums.items():
        averaged[stage] = total / members
    logits = model.query_decoder(averaged, queries)
    if prior_sum is not None:
        logits = model.add_prior(logits, prior_sum / members)
    return logits
