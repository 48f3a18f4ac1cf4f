"""The "vit" architecture written out as one transformer over the full concatenated sequence.

Per query b of group g = b // (B // G) the sequence is [g's K * 2n prompt tokens, M latents (with
a bottleneck), the query's n tokens] and every layer attends under an explicit mask:

    prompt rows  -> valid prompt tokens
    latent rows  -> valid prompt tokens and latents
    query rows   -> valid prompt tokens (latents instead, with a bottleneck) and the query's tokens

This is what the paper's model computes for every query, with nothing cached; the cached path of
promptseg.model.vit must give the same logits (tests/test_vit.py), and benchmarks/model/vit_cache.py
times the two against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptseg.model.attention import merge_heads, split_heads
from promptseg.model.network import PromptSegNet
from promptseg.model.vit import ROLE_QUERY


def full_sequence_mask(
    prompt_tokens: int, valid: torch.Tensor, latents: int, query_tokens: int
) -> torch.Tensor:
    """Allowed (row attends to column) mask (B, T, T) bool, T = prompt_tokens + latents +
    query_tokens; valid (B,) long: the valid prompt tokens of each sequence (the rest is
    padding)."""
    total = prompt_tokens + latents + query_tokens
    index = torch.arange(total, device=valid.device)
    valid_prompt = index[None, :] < valid[:, None]  # (B, T) as keys
    is_latent = ((index >= prompt_tokens) & (index < prompt_tokens + latents))[None, :]
    is_query = (index >= prompt_tokens + latents)[None, :]
    prompt_rows = valid_prompt
    latent_rows = valid_prompt | is_latent
    query_rows = ((is_latent if latents > 0 else valid_prompt) | is_query).expand_as(valid_prompt)
    row_kind = torch.zeros(total, dtype=torch.long, device=valid.device)
    row_kind[prompt_tokens : prompt_tokens + latents] = 1
    row_kind[prompt_tokens + latents :] = 2
    choices = torch.stack([prompt_rows, latent_rows, query_rows], dim=1)  # (B, 3, T)
    return choices[:, row_kind, :]


def full_sequence_logits(
    model: PromptSegNet,
    images: torch.Tensor,
    maps: torch.Tensor,
    types: torch.Tensor,
    queries: torch.Tensor,
    num_prompts: torch.Tensor | None = None,
    explicit: bool = True,
) -> torch.Tensor:
    """Logits (B, R, R) of a "vit" model computed over the full masked sequence of every query.

    images (G, K, C, R, R), maps (G, K, R, R), types (G, K), queries (B, C, R, R) with B % G == 0,
    num_prompts (G,) or None. explicit=True: softmax(q kᵀ / √D masked) v written out (the reference
    semantics, in the inputs' dtype, e.g. float64); False: scaled_dot_product_attention with the
    same boolean mask (the fast way to recompute everything, for benchmarks).
    """
    config = model.config
    if config.architecture != "vit":
        raise ValueError(
            f"full_sequence_logits needs a vit model, not architecture {config.architecture!r}"
        )
    embedding, encoder = model.embedding, model.encoder
    prompts = embedding.prompts(encoder, images, maps, types)  # (G, P, C)
    query_tokens = embedding.images(encoder(queries), ROLE_QUERY)  # (B, n, C)
    valid = None if num_prompts is None else num_prompts * (prompts.shape[1] // images.shape[1])
    return full_sequence_decode(model, prompts, query_tokens, valid, queries.shape[-1], explicit)


def full_sequence_decode(
    model: PromptSegNet,
    prompts: torch.Tensor,
    query_tokens: torch.Tensor,
    valid: torch.Tensor | None,
    resolution: int,
    explicit: bool = True,
) -> torch.Tensor:
    """The transformer over the full sequences from embedded tokens: prompt tokens (G, P, C), query
    tokens (B, n, C) with B % G == 0, valid (G,) valid prompt tokens per group or None
    -> logits (B, resolution, resolution). `explicit` as in `full_sequence_logits`."""
    config = model.config
    groups, prompt_tokens = prompts.shape[:2]
    batch = query_tokens.shape[0]
    per_group = batch // groups
    parts = [prompts.repeat_interleave(per_group, dim=0)]
    latents = model.prompt_encoder.latents
    if latents is not None:
        parts.append(latents.to(prompts.dtype).expand(batch, -1, -1))
    parts.append(query_tokens)
    x = torch.cat(parts, dim=1)  # (B, T, C)
    if valid is None:
        per_query = torch.full((batch,), prompt_tokens, dtype=torch.long, device=x.device)
    else:
        per_query = valid.to(x.device).repeat_interleave(per_group)
    allowed = full_sequence_mask(
        prompt_tokens, per_query, config.bottleneck_tokens, query_tokens.shape[1]
    )[:, None]
    for block in model.blocks:
        attention = block.attention
        h = block.norm_attention(x)
        q, k, v = (
            split_heads(proj(h), config.head_dim)
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        if explicit:
            scores = torch.matmul(q, k.transpose(-1, -2)) * config.head_dim**-0.5
            out = torch.matmul(
                torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), v
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + attention.out_proj(merge_heads(out))
        x = x + block.mlp(block.norm_mlp(x))
    return model.query_decoder(x[:, -query_tokens.shape[1] :], resolution)
