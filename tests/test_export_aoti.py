"""AOTInductor export: the packages against the eager model in Python, and the C++ example.

One module-scoped export of the tiny model serves every test. It is the slow part (about 2 to 4
minutes on 2 busy CPU cores: two Inductor compiles with g++); building examples/cpp adds about 30 s.

Tolerance: both sides compute in float32 from the same weights; the packages differ only in
fusion and reduction order, which moves a logit by a few float32 ulps per layer (measured about
3e-6 on logits of magnitude ~2). LOGIT_ATOL = 1e-4, scaled by max(1, max|logit|) as in the ONNX
tests, leaves a 30x margin and still catches any real error (a wrong weight, shape or prompt type
moves logits by ~1e-1). The scale matters for click and scribble prompts on these random maps:
every token is touched, the label-propagation prior saturates near 1 and its logit (up to ~8) is
steep there, so float32 reordering moves it by about 1e-4 (an input perturbation of 1e-6 moves
such logits by 3e-4 against 1e-5 for mask prompts, in eager PyTorch alone).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from promptseg.engine.backends.aoti_runner import (
    DECODER_FILE,
    ENCODER_FILE,
    METADATA_FILE,
    AOTIRunner,
    load_aoti,
)
from promptseg.errors import InputError, PromptSegError
from promptseg.export.aoti_export import check_compiler, export_aoti
from promptseg.export.graphs import encoding_names, flatten_encoding
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.prompt_types import PROMPT_TYPES
from promptseg.model.weights import load_model
from tests.helpers import tiny_checkpoint  # noqa: F401

LOGIT_ATOL = 1e-4
MIN_DICE = 0.99
CPP_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "cpp"


@pytest.fixture(scope="module")
def eager_model(tiny_checkpoint: Path) -> PromptSegNet:  # noqa: F811
    """The tiny model as the packages are exported: eval, float32, SDPA attention."""
    return load_model(tiny_checkpoint).float().eval().set_attention_kernel("sdpa")


@pytest.fixture(scope="module")
def package_dir(eager_model: PromptSegNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one export_aoti of the tiny model (compiled once for the module)."""
    try:
        check_compiler()
    except PromptSegError as error:
        pytest.skip(str(error))
    out_dir = tmp_path_factory.mktemp("aoti")
    export_aoti(eager_model, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def runner(package_dir: Path) -> AOTIRunner:
    return load_aoti(package_dir)


def random_prompts(
    config: ModelConfig, shots: int, batch: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """images (1, K, C, R, R), maps (1, K, R, R) in {0, 1}, types (1, K) of non-query kinds, queries
    (B, C, R, R)."""
    r, c = config.resolution, config.in_channels
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(1, shots, c, r, r, generator=generator)
    maps = (torch.rand(1, shots, r, r, generator=generator) > 0.5).float()
    types = torch.randint(PROMPT_TYPES["mask"], len(PROMPT_TYPES), (1, shots), generator=generator)
    queries = torch.rand(batch, c, r, r, generator=generator)
    return images, maps, types, queries


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# K in {1, 4} x B in {1, 3}, plus K = 16, B = 20: past the batch-16 convolution heuristic whose
# compile-time hint Inductor records as a range (see the aoti_export docstring).
@pytest.mark.parametrize(("shots", "batch"), [(1, 1), (1, 3), (4, 1), (4, 3), (16, 20)])
def test_packages_match_eager_for_any_k_and_b(
    eager_model: PromptSegNet, runner: AOTIRunner, shots: int, batch: int
) -> None:
    images, maps, types, queries = random_prompts(
        eager_model.config, shots, batch, seed=100 * shots + batch
    )
    with torch.no_grad():
        expected_encoding = flatten_encoding(eager_model.encode_prompts(images, maps, types))
        expected = eager_model(images, maps, types, queries)
    encoding = runner.encode(images, maps, types)
    logits = runner.decode(queries, *encoding)

    assert [t.shape for t in encoding] == [t.shape for t in expected_encoding]
    for got, want in zip(encoding, expected_encoding):
        torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    assert logits.shape == (batch, eager_model.config.resolution, eager_model.config.resolution)
    error = (logits - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error < LOGIT_ATOL * scale, (
        f"max |logit error| {error:.2e} (scale {scale:.1f}) for K={shots}, B={batch}"
    )
    assert dice((logits > 0).numpy(), (expected > 0).numpy()) >= MIN_DICE


def test_metadata_describes_the_packages(
    eager_model: PromptSegNet, package_dir: Path, runner: AOTIRunner
) -> None:
    config = eager_model.config
    metadata = json.loads((package_dir / METADATA_FILE).read_text())
    names = encoding_names(config)
    assert (
        metadata["version"] == 1 and metadata["device"] == "cpu" and metadata["dtype"] == "float32"
    )
    assert (metadata["resolution"], metadata["in_channels"]) == (
        config.resolution,
        config.in_channels,
    )
    assert ModelConfig.from_dict(metadata["model_config"]) == config
    assert metadata["encoding_names"] == names
    assert metadata["tokens_per_prompt"] == [16, 4]  # 4x4 and 2x2 grids of a 32-pixel input
    assert metadata["prompt_encoder"] == {
        "file": ENCODER_FILE,
        "inputs": ["prompt_images", "prompt_maps", "prompt_types"],
        "outputs": names,
    }
    assert metadata["query_decoder"] == {
        "file": DECODER_FILE,
        "inputs": ["queries", *names],
        "outputs": ["logits"],
    }
    embedded = runner.encoder.get_metadata()
    assert embedded["promptseg.resolution"] == str(config.resolution)
    assert embedded["promptseg.in_channels"] == str(config.in_channels)
    assert embedded["promptseg.mask_prompt_type"] == str(PROMPT_TYPES["mask"])


def test_existing_outputs_are_refused_without_overwrite(
    eager_model: PromptSegNet, package_dir: Path
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in package_dir.iterdir()}
    with pytest.raises(InputError, match="exists; pass --overwrite to replace it") as caught:
        export_aoti(eager_model, package_dir)
    assert str(package_dir) in str(caught.value)
    assert {p.name: p.stat().st_mtime_ns for p in package_dir.iterdir()} == before


def test_missing_or_corrupt_packages_are_one_line_input_errors(
    package_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(package_dir, broken)
    decoder = broken / DECODER_FILE
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
    with pytest.raises(InputError, match="not a loadable AOTInductor package") as caught:
        load_aoti(broken)
    assert str(decoder) in str(caught.value) and "\n" not in str(caught.value)
    decoder.unlink()
    with pytest.raises(InputError, match=f"{DECODER_FILE}: not found"):
        load_aoti(broken)
    (broken / METADATA_FILE).write_text("{ not json")
    with pytest.raises(InputError, match=f"{METADATA_FILE}: unreadable metadata"):
        load_aoti(broken)


def test_missing_compiler_is_a_one_line_error(eager_model: PromptSegNet, tmp_path: Path) -> None:
    with torch._inductor.config.patch({"cpp.cxx": ("promptseg-no-such-compiler",)}):
        with pytest.raises(PromptSegError, match="needs a C\\+\\+ compiler") as caught:
            export_aoti(eager_model, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cpp_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/cpp built against the torch wheel's libtorch; skipped when the toolchain is
    missing."""
    compiler = os.environ.get("CXX") or "c++"
    for tool in ("cmake", compiler):
        if shutil.which(tool) is None:
            pytest.skip(f"building examples/cpp needs {tool} on PATH")
    prefix = Path(torch.utils.cmake_prefix_path)
    if not (prefix / "Torch" / "TorchConfig.cmake").is_file():
        pytest.skip(f"this torch installation ships no libtorch CMake config under {prefix}")
    build = tmp_path_factory.mktemp("cpp-build")
    steps = (
        ["cmake", "-S", str(CPP_SOURCE), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
        ["cmake", "--build", str(build), "--parallel", "2"],
    )
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return build / "promptseg_segment"


def test_cpp_example_matches_eager(
    eager_model: PromptSegNet, package_dir: Path, cpp_binary: Path, tmp_path: Path
) -> None:
    images, maps, _, queries = random_prompts(eager_model.config, shots=1, batch=1, seed=7)
    types = torch.full((1, 1), PROMPT_TYPES["mask"], dtype=torch.long)
    paths = {name: tmp_path / f"{name}.raw" for name in ("image", "mask", "query", "out")}
    for name, tensor in (("image", images), ("mask", maps), ("query", queries)):
        tensor.numpy().astype("<f4").tofile(paths[name])
    result = subprocess.run(
        [
            str(cpp_binary),
            str(package_dir),
            *(str(paths[n]) for n in ("image", "mask", "query", "out")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    r = eager_model.config.resolution
    mask = np.fromfile(paths["out"], dtype=np.uint8)
    assert mask.size == r * r and set(np.unique(mask)) <= {0, 255}
    with torch.no_grad():
        expected = (eager_model(images, maps, types, queries)[0] > 0).numpy().reshape(-1)
    assert dice(mask == 255, expected) >= MIN_DICE
    fraction = float(result.stdout.split("foreground fraction")[1])
    assert fraction == pytest.approx((mask == 255).mean(), abs=1e-4)


def test_cpp_example_reports_bad_inputs_in_one_line(
    package_dir: Path, cpp_binary: Path, tmp_path: Path
) -> None:
    short = tmp_path / "short.raw"
    np.zeros(10, dtype="<f4").tofile(short)
    result = subprocess.run(
        [
            str(cpp_binary),
            str(package_dir),
            str(short),
            str(short),
            str(short),
            str(tmp_path / "out.raw"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and f"{short}: expected" in result.stderr
