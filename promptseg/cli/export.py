"""`promptseg export`: the model as ONNX graphs, TensorRT engines or AOTInductor packages.

promptseg export --format onnx --out DIR        DIR/prompt_encoder.onnx, DIR/query_decoder.onnx
promptseg export --format tensorrt --out DIR    DIR/onnx/*.onnx, then DIR/prompt_encoder.plan,
DIR/query_decoder.plan
promptseg export --format aoti --out DIR        DIR/prompt_encoder.pt2, DIR/query_decoder.pt2 (+
metadata)
"""

from __future__ import annotations

import argparse
import os

from promptseg.cli.commands import COMMANDS
from promptseg.cli.common import resolve_device
from promptseg.errors import InputError
from promptseg.model.weights import load_model, packaged_weights_path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help=COMMANDS["export"].help,
        description="Export the prompt encoder and the query decoder as two graphs, dynamic in the "
        "number of "
        "prompts K and the query batch B: ONNX (for ONNX Runtime and TensorRT), TensorRT 10 or 11 "
        "engines (needs the "
        "tensorrt package and a CUDA GPU) or AOTInductor .pt2 packages (for C++; see "
        "examples/cpp).",
    )
    parser.add_argument(
        "--format",
        choices=["onnx", "tensorrt", "aoti"],
        required=True,
        help="onnx: two ONNX graphs; tensorrt: those graphs and TensorRT engines built from them; "
        "aoti: two AOTInductor .pt2 packages",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created when needed)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights file (default: the weights shipped with promptseg)",
    )
    parser.add_argument(
        "--device", metavar="DEV", help="aoti: compile for cpu or cuda (default cpu)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    tensorrt = parser.add_argument_group("tensorrt")
    tensorrt.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp16",
        help="precision the engines compute in",
    )
    tensorrt.add_argument(
        "--max-batch", type=int, default=64, metavar="B", help="largest query batch of the profile"
    )
    tensorrt.add_argument(
        "--max-prompts",
        type=int,
        default=16,
        metavar="K",
        help="largest prompt count of the profile",
    )
    tensorrt.add_argument(
        "--timing-cache", metavar="FILE", help="TensorRT timing cache, read and updated"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1 or args.max_prompts < 1:
        raise InputError("--max-batch/--max-prompts", "must be positive")
    checkpoint = args.checkpoint or packaged_weights_path()
    model = load_model(checkpoint).eval()
    if args.format == "onnx":
        from promptseg.export.onnx_export import export_onnx

        written = export_onnx(model, args.out, overwrite=args.overwrite)
    elif args.format == "aoti":
        from promptseg.export.aoti_export import export_aoti

        written = export_aoti(
            model.to(resolve_device(args.device or "cpu")), args.out, overwrite=args.overwrite
        )
    else:
        import torch

        from promptseg.engine.backends.tensorrt_runtime import require_tensorrt_gpu
        from promptseg.export.onnx_export import export_onnx
        from promptseg.export.tensorrt_build import build_engines, onnx_dtype_for

        trt = require_tensorrt_gpu()  # before writing any ONNX file
        dtype = getattr(
            torch, onnx_dtype_for(args.precision, trt)
        )  # float16 for fp16 on TensorRT 11
        onnx_dir = os.path.join(args.out, "onnx")
        export_onnx(model, onnx_dir, dtype=dtype, overwrite=args.overwrite)
        written = build_engines(
            onnx_dir,
            args.out,
            max_batch=args.max_batch,
            max_prompts=min(args.max_prompts, model.config.max_prompts),
            precision=args.precision,
            timing_cache=args.timing_cache,
            overwrite=args.overwrite,
        )
    for role, path in written.items():
        print(f"{role}: {path}")
    return 0
