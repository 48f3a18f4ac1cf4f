"""CPU time per query of the "vit" model: cached prompt encoding + query decoding against
recomputing the full masked sequence for every query (issue 20's target: >= 5x at K = 8, batch 16).

    python -m benchmarks.model.vit_cache --config configs/promptseg_vit_small.yaml
    python -m benchmarks.model.vit_cache --config configs/promptseg_vit_base.yaml --repeats 1

Random weights (timing only). One prompt set of K prompts, B queries, torch.inference_mode, float32,
--threads intra-op threads. Four timings, each the median of --repeats after one warm-up:

    encode         model.encode_prompts (once per prompt set; not per query)
    cached         model.decode(queries, cache): query ViT encoding + query-side decoder
    full           full_sequence_logits(..., explicit=False): prompt and query ViT encodings, then
                   the decoder over each query's full sequence (K * 2n prompt tokens + n query
                   tokens) under the image_only_causal-style mask, through SDPA with a boolean mask
    *_decoder      the same two without the ViT encodings (tokens embedded beforehand)

The full-sequence path already encodes the prompt images once per batch rather than once per query,
so its per-query time is a lower bound on recomputing everything. The logits of cached and full
decoding are compared (max abs difference, float32). Results:
benchmarks/results/vit-cache-cpu-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from promptseg.model import PromptSegNet, count_parameters
from promptseg.model.vit import ROLE_QUERY
from promptseg.model.vit_reference import full_sequence_decode, full_sequence_logits
from promptseg.train.config import TrainConfig

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config_path: Path, shots: int, batch: int, repeats: int, seed: int) -> dict:
    """Per-query milliseconds of cached and full-sequence decoding for the model of
    `config_path`."""
    config = TrainConfig.load(config_path).model_config()
    if config.architecture != "vit":
        raise SystemExit(f"{config_path}: not a vit model config")
    torch.manual_seed(seed)
    model = PromptSegNet(config).eval()
    r, c = config.resolution, config.in_channels
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, shots, c, r, r, generator=g)
    maps = (torch.rand(1, shots, r, r, generator=g) > 0.5).float()
    types = torch.ones(1, shots, dtype=torch.long)
    queries = torch.rand(batch, c, r, r, generator=g)
    with torch.inference_mode():
        cache = model.encode_prompts(images, maps, types)
        features = model.query_features(queries)
        embedding = model.embedding
        prompt_tokens = embedding.prompts(model.encoder, images, maps, types)
        query_tokens = embedding.images(features[-1], ROLE_QUERY)
        cached = model.decode(queries, cache)
        full = full_sequence_logits(model, images, maps, types, queries, explicit=False)
        seconds = {
            "encode": median_seconds(lambda: model.encode_prompts(images, maps, types), repeats),
            "cached": median_seconds(lambda: model.decode(queries, cache), repeats),
            "full": median_seconds(
                lambda: full_sequence_logits(model, images, maps, types, queries, explicit=False),
                repeats,
            ),
            "cached_decoder": median_seconds(
                lambda: model.decode_features(features, queries, cache), repeats
            ),
            "full_decoder": median_seconds(
                lambda: full_sequence_decode(
                    model, prompt_tokens, query_tokens, None, r, explicit=False
                ),
                repeats,
            ),
        }
    per_query = {name: 1000.0 * value / batch for name, value in seconds.items()}
    per_query["encode"] = 1000.0 * seconds["encode"]  # once per prompt set
    return {
        "config": str(config_path),
        "parameters": count_parameters(model),
        "shots": shots,
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "prompt_tokens": int(cache.keys[0][0].shape[2]),
        "query_tokens": int(query_tokens.shape[1]),
        "ms_per_query": per_query,
        "encode_ms_per_prompt_set": per_query.pop("encode"),
        "speedup": seconds["full"] / seconds["cached"],
        "speedup_decoder": seconds["full_decoder"] / seconds["cached_decoder"],
        "max_abs_logit_difference": float((cached - full).abs().max()),
    }


def markdown(row: dict) -> str:
    ms = row["ms_per_query"]
    return "\n".join(
        [
            f"# Cached vs full-sequence decoding, CPU ({row['threads']} thread(s)): "
            f"{row['config']}",
            "",
            (
                f"{row['parameters']:,} parameters (random weights), K = {row['shots']} prompts "
                f"({row['prompt_tokens']} prompt tokens), batch {row['batch']} queries of "
                f"{row['query_tokens']} tokens, "
                f"median of {row['repeats']} after a warm-up. Prompt encoding: "
                f"{row['encode_ms_per_prompt_set']:.1f} ms "
                "once per prompt set."
            ),
            "",
            "| ms per query | cached | full sequence | full / cached |",
            "|---|---|---|---|",
            f"| query encoding + decoder | {ms['cached']:.2f} | {ms['full']:.2f} | "
            f"{row['speedup']:.1f}x |",
            f"| decoder only | {ms['cached_decoder']:.2f} | {ms['full_decoder']:.2f} | "
            f"{row['speedup_decoder']:.1f}x |",
            "",
            f"max |cached - full| logits: {row['max_abs_logit_difference']:.2e} (float32)",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/promptseg_vit_small.yaml"))
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    row = measure(args.config, args.shots, args.batch, args.repeats, args.seed)
    table = markdown(row)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"vit-cache-cpu-{args.config.stem}"
    stem.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
