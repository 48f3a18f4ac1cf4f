"""The two graphs as AOTInductor packages, for Python and for C++ (examples/cpp).

`export_aoti(model, DIR)` writes

    DIR/prompt_encoder.pt2    prompt_images (1, K, C, R, R) float32, prompt_maps (1, K, R, R)
    float32,
                              prompt_types (1, K) int64 -> encoding tensors (1, H, K * n_i, D)
                              float32, in the order of `encoding_names`
    DIR/query_decoder.pt2     queries (B, C, R, R) float32, encoding tensors -> logits (B, R, R)
    float32
    DIR/promptseg_aoti.json   metadata: resolution, channels, model config, tensor names, device

Dynamic shapes: one Dim `prompts` (K, 1..max_prompts) and one Dim `batch` (B, 1..). The encoding
tensors of attention stage i carry n_i tokens per prompt (n_i = (R / stride_i)^2), so the decoder
declares their token dim as the derived Dim `n_i * prompts`: one decoder serves the encoder's
output for every K. With a prompt bottleneck the token count is the fixed number of latents.
Each package also embeds `promptseg.*` metadata (resolution, in_channels, mask prompt type), which
is all the C++ example needs, so it reads no JSON.

The packages' own input checks (off unless AOTI_RUNTIME_CHECK_INPUTS=1) are not usable: they
enforce export's assumption K, B >= 2 and the range Inductor recorded for the example inputs' CPU
convolution backend (batch < 16), while the compiled code is correct for every K and B
(tests/test_export_aoti.py runs K = 1, B = 1 and K = 16, B = 20). `AOTIRunner` and examples/cpp
check shapes themselves instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram

import promptseg
from promptseg.engine.backends.aoti_runner import (
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
)
from promptseg.errors import PromptSegError
from promptseg.export.graphs import (
    LOGITS_NAME,
    PROMPT_INPUT_NAMES,
    QUERY_INPUT_NAME,
    PromptEncoderGraph,
    QueryDecoderGraph,
    encoding_names,
    encoding_stages,
    example_inputs,
    tokens_per_prompt,
)
from promptseg.files import refuse_existing
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.prompt_types import PROMPT_TYPES

EXPORT_BACKEND = "sdpa"


def export_aoti(
    model: PromptSegNet, out_dir: str | os.PathLike, overwrite: bool = False
) -> dict[str, Path]:
    """Compile both graphs of `model` into `out_dir`; returns {"prompt_encoder", "query_decoder",
    "metadata": path}.

    The packages run in float32 on the model's device (cpu, or cuda when the model is there). Files
    are built in a temporary folder inside `out_dir` and moved in at the end, metadata last.
    """
    out_dir = Path(out_dir)
    targets = {
        "prompt_encoder": out_dir / ENCODER_FILE,
        "query_decoder": out_dir / DECODER_FILE,
        "metadata": out_dir / METADATA_FILE,
    }
    refuse_existing(list(targets.values()), overwrite)
    check_compiler()
    device = next(model.parameters()).device
    # A float32 copy with SDPA attention: the caller's model keeps its dtype and backend.
    export_model = copy.deepcopy(model).float().eval().set_attention_kernel(EXPORT_BACKEND)
    encoder_program, decoder_program = export_programs(export_model, device)
    package_metadata = embedded_metadata(model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".aoti-", dir=out_dir))
    try:
        compile_package(encoder_program, staging / ENCODER_FILE, package_metadata)
        compile_package(decoder_program, staging / DECODER_FILE, package_metadata)
        (staging / METADATA_FILE).write_text(
            json.dumps(export_metadata(model.config, device), indent=2) + "\n"
        )
        for path in targets.values():
            os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def check_compiler() -> None:
    """Raise PromptSegError (one line) when Inductor finds no working C++ compiler."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as exc:
        raise PromptSegError(
            f"AOTInductor export needs a C++ compiler (install g++ or set CXX): {exc}"
        ) from None


def export_programs(
    model: PromptSegNet, device: torch.device
) -> tuple[ExportedProgram, ExportedProgram]:
    """torch.export both graphs of a float32 eval-mode `model` with dynamic K (and B for the
    decoder)."""
    config = model.config
    (images, maps, types), queries = example_inputs(config)
    images, maps, types, queries = (t.to(device) for t in (images, maps, types, queries))
    prompts = Dim("prompts", min=1, max=config.max_prompts)
    batch = Dim("batch", min=1)
    encoder = torch.export.export(
        PromptEncoderGraph(model),
        (images, maps, types),
        dynamic_shapes=({1: prompts}, {1: prompts}, {1: prompts}),
    )
    with torch.no_grad():
        encoding = PromptEncoderGraph(model)(images, maps, types)
    stage_dims = [None if n is None else n * prompts for n in tokens_per_prompt(config)]
    token_dims = [stage_dims[stage] for stage in encoding_stages(config)]
    decoder = torch.export.export(
        QueryDecoderGraph(model),
        (queries, *encoding),
        dynamic_shapes=({0: batch}, tuple({} if dim is None else {2: dim} for dim in token_dims)),
    )
    return encoder, decoder


def embedded_metadata(config: ModelConfig) -> dict[str, str]:
    """String metadata stored inside each package (read by the C++ example through
    get_metadata())."""
    return {
        "promptseg.resolution": str(config.resolution),
        "promptseg.in_channels": str(config.in_channels),
        "promptseg.mask_prompt_type": str(PROMPT_TYPES["mask"]),
    }


def compile_package(program: ExportedProgram, path: Path, metadata: dict[str, str]) -> None:
    """AOTInductor-compile `program` into the .pt2 file `path`, embedding `metadata`."""
    with warnings.catch_warnings():
        # torch's own packaging code trips a pytree deprecation warning that users cannot act on.
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
        )
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": dict(metadata)},
        )


def export_metadata(config: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Contents of promptseg_aoti.json."""
    names = encoding_names(config)
    return {
        "format": "promptseg-aoti",
        "version": FORMAT_VERSION,
        "promptseg_version": promptseg.__version__,
        "torch_version": torch.__version__,
        "device": device.type,
        "dtype": "float32",
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "model_config": json.loads(config.to_json()),
        "prompt_types": dict(PROMPT_TYPES),
        "encoding_names": names,
        "tokens_per_prompt": tokens_per_prompt(config),
        "dynamic": {"prompts": [1, config.max_prompts], "batch": [1, None]},
        "prompt_encoder": {
            "file": ENCODER_FILE,
            "inputs": list(PROMPT_INPUT_NAMES),
            "outputs": names,
        },
        "query_decoder": {
            "file": DECODER_FILE,
            "inputs": [QUERY_INPUT_NAME, *names],
            "outputs": [LOGITS_NAME],
        },
    }
