"""The `promptseg` command line: segment and demo end to end, and every bad input as one line with
exit 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, tiny_checkpoint, write_nifti, write_png  # noqa: F401 (fixture)
from PIL import Image
from safetensors.torch import save_file

from promptseg.cli import main
from promptseg.engine.legend import legend_size
from promptseg.engine.overlay import RED, contour, montage, overlay
from promptseg.model import ModelConfig, PromptSegNet
from promptseg.model.weights import CONFIG_KEY

AFFINE = np.array(
    [[0.0, -0.8, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt and query PNGs (40x48 disks), an empty mask, a scribble and a NIfTI volume with a
    rotated affine."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for n in range(2):
        image, mask = disk_example(rng, (40, 48))
        write_png(root / f"p{n}.png", image)
        write_png(root / f"p{n}_mask.png", mask * 255)
    for n in range(2):
        write_png(root / f"q{n}.png", disk_example(rng, (36, 44))[0])
    write_png(root / "empty_mask.png", np.zeros((40, 48), dtype=np.uint8))
    scribble = np.zeros((40, 48), dtype=np.uint8)
    scribble[20, 18:30] = 1
    write_png(root / "scribble.png", scribble)
    volume = np.stack([disk_example(rng, (20, 24))[0] for _ in range(5)], axis=-1).astype(np.int16)
    write_nifti(root / "scan.nii.gz", volume, AFFINE, b"cli test scan")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in-process -> (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mask_prompts(data: Path) -> list[str]:
    return [
        "--prompt",
        str(data / "p0.png"),
        str(data / "p0_mask.png"),
        "--prompt",
        str(data / "p1.png"),
        str(data / "p1_mask.png"),
    ]


def test_python_m_promptseg_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "promptseg", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("segment", "train", "eval", "export", "bench", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["segment", "train", "eval", "export", "bench", "demo"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0 and f"promptseg {command}" in out


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["segment", "--out", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--query" in err


def test_segment_png_queries(
    data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        *mask_prompts(data),
        "--query",
        data / "q0.png",
        data / "q1.png",
        "--out",
        out,
        "--checkpoint",
        tiny_checkpoint,
        "--overlay",
        "--save-probabilities",
        "--no-progress",
    ]
    code, stdout, err = run(["segment", *argv], capsys)
    assert code == 0, err
    assert "2 queries" in stdout
    for name in ("q0", "q1"):
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert (
            mask.shape == (36, 44) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        )
        probabilities = np.load(out / f"{name}_prob.npy")
        assert probabilities.shape == (36, 44) and probabilities.dtype == np.float32
        assert np.array_equal(mask == 255, probabilities > 0.5)
        with Image.open(out / f"{name}_overlay.png") as picture:
            picture.verify()
        legend_height, legend_width = legend_size([("prediction", RED)])
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == (
            36 + legend_height,
            max(44, legend_width),
            3,
        )
    code, _, err = run(["segment", *argv], capsys)
    assert code == 2 and "output exists" in err and "--overwrite" in err
    assert run(["segment", *argv, "--overwrite"], capsys)[0] == 0


def test_segment_nifti_keeps_geometry(
    data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = run(
        [
            "segment",
            *mask_prompts(data),
            "--query",
            data / "scan.nii.gz",
            "--out",
            out,
            "--checkpoint",
            tiny_checkpoint,
            "--overlay",
            "--save-probabilities",
            "--max-batch",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    source = nib.load(data / "scan.nii.gz")
    for name, dtype in (("scan_mask.nii.gz", np.uint8), ("scan_prob.nii.gz", np.float32)):
        result = nib.load(out / name)
        assert result.shape == (20, 24, 5) and result.get_data_dtype() == dtype
        np.testing.assert_allclose(result.affine, AFFINE, atol=1e-5)
        assert result.header["descrip"] == source.header["descrip"]
        assert result.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_allclose(result.header["pixdim"], source.header["pixdim"])
    assert set(np.unique(np.asarray(nib.load(out / "scan_mask.nii.gz").dataobj))) <= {0, 1}
    with Image.open(out / "scan_overlay.png") as picture:
        picture.verify()


def test_segment_sparse_prompts(
    data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(
        [
            "segment",
            "--prompt-image",
            data / "p0.png",
            "--click",
            20,
            18,
            "--click",
            24,
            20,
            "--box",
            10,
            8,
            30,
            28,
            "--prompt-image",
            data / "p1.png",
            "--scribble",
            data / "scribble.png",
            "--query",
            data / "q0.png",
            "--out",
            out,
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 0, err
    assert "3 prompts" in stdout and (out / "q0_mask.png").is_file()


def test_empty_prompt_mask_warns(
    data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = run(
        [
            "segment",
            "--prompt",
            data / "p0.png",
            data / "empty_mask.png",
            "--query",
            data / "q0.png",
            "--out",
            out,
            "--checkpoint",
            tiny_checkpoint,
        ],
        capsys,
    )
    assert code == 0
    assert (
        err.count("\n") == 1 and err.startswith("promptseg: warning:") and "empty_mask.png" in err
    )
    assert (out / "q0_mask.png").is_file()


def _other_config_checkpoint(tmp: Path) -> Path:
    """Tensors of another configuration under this configuration's metadata."""
    other = PromptSegNet(
        ModelConfig(
            resolution=32,
            widths=(8, 16, 48, 48),
            head_dim=16,
            attention_depth=1,
            blocks_per_stage=1,
        )
    )
    tensors = {
        name: tensor.detach().clone().contiguous() for name, tensor in other.state_dict().items()
    }
    save_file(tensors, str(tmp / "other.safetensors"), metadata={CONFIG_KEY: TINY_CONFIG.to_json()})
    return tmp / "other.safetensors"


def _file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def _npy(tmp: Path, name: str, array: np.ndarray) -> Path:
    np.save(tmp / name, array)
    return tmp / name


def _truncated_nifti(data: Path, tmp: Path) -> Path:
    content = (data / "scan.nii.gz").read_bytes()
    return _file(tmp, "truncated.nii.gz", content[: len(content) // 2])


def _many_prompts(data: Path, tmp: Path) -> list[object]:
    image, mask = (
        write_png(tmp / "s.png", np.full((8, 8), 9, np.uint8)),
        write_png(tmp / "s_mask.png", np.eye(8, dtype=np.uint8)),
    )
    return [item for _ in range(65) for item in ("--prompt", image, mask)]


ArgvBuilder = Callable[[Path, Path], tuple[list[object], list[object], str]]
# Each case: (data, scratch folder) -> (prompt arguments, query paths, text the one-line error must
# contain).
BAD_INPUTS: dict[str, ArgvBuilder] = {
    "missing query": lambda d, t: (
        mask_prompts(d),
        [t / "absent.png"],
        "absent.png: file not found",
    ),
    "missing prompt mask": lambda d, t: (
        ["--prompt", d / "p0.png", t / "nope.png"],
        [d / "q0.png"],
        "nope.png: file not found",
    ),
    "corrupt png": lambda d, t: (
        mask_prompts(d),
        [_file(t, "noise.png", np.random.default_rng(1).bytes(300))],
        "noise.png: unreadable",
    ),
    "corrupt prompt png": lambda d, t: (
        ["--prompt", _file(t, "bad.png", b"\x89PNG junk"), d / "p0_mask.png"],
        [d / "q0.png"],
        "bad.png: unreadable",
    ),
    "truncated nifti": lambda d, t: (
        mask_prompts(d),
        [_truncated_nifti(d, t)],
        "truncated.nii.gz: unreadable",
    ),
    "shape mismatch": lambda d, t: (
        ["--prompt", d / "p0.png", d / "q0.png"],
        [d / "q1.png"],
        "differs from image shape",
    ),
    "no prompts": lambda d, t: ([], [d / "q0.png"], "--prompt: no prompts given"),
    "too many prompts": lambda d, t: (
        _many_prompts(d, t),
        [d / "q0.png"],
        "--prompt: too many prompts: 65",
    ),
    "nan intensities": lambda d, t: (
        mask_prompts(d),
        [_npy(t, "nan.npy", np.full((16, 16), np.nan, np.float32))],
        "nan.npy: image contains non-finite",
    ),
    "4d nifti": lambda d, t: (
        mask_prompts(d),
        [write_nifti(t / "four.nii.gz", np.zeros((8, 8, 4, 2), np.float32))],
        "four.nii.gz: 4D input",
    ),
    # (16, 16, 5) has no channel axis: a 5-slice volume (data/volumes.py), fine as a query, not as a
    # prompt
    "volume as prompt": lambda d, t: (
        ["--prompt", _npy(t, "five.npy", np.zeros((16, 16, 5), np.float32)), d / "p0_mask.png"],
        [d / "q0.png"],
        "five.npy must be 2D, got a volume of shape (16, 16, 5)",
    ),
    "absent label": lambda d, t: (
        [*mask_prompts(d), "--label", 7],
        [d / "q0.png"],
        "p0_mask.png: requested label 7 is absent",
    ),
    "click before image": lambda d, t: (
        ["--click", 3, 4, "--prompt-image", d / "p0.png"],
        [d / "q0.png"],
        "--click: must follow a --prompt-image",
    ),
    "box outside": lambda d, t: (
        ["--prompt-image", d / "p0.png", "--box", 100, 100, 120, 120],
        [d / "q0.png"],
        "p0.png: the box lies outside",
    ),
    "one bad query among good": lambda d, t: (
        mask_prompts(d),
        [d / "q0.png", _npy(t, "bad.npy", np.array([[np.inf, 0.0], [1.0, 2.0]]))],
        "bad.npy",
    ),
    "clashing names": lambda d, t: (
        mask_prompts(d),
        [d / "q0.png", _npy(t, "q0.npy", np.zeros((8, 8)))],
        "same output name 'q0'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts, queries, expected = BAD_INPUTS[case](data, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(
        ["segment", *prompts, "--query", *queries, "--out", out, "--checkpoint", tiny_checkpoint],
        capsys,
    )
    assert code == 2
    assert err.startswith("promptseg: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["other configuration", "not safetensors"])
def test_bad_checkpoint(
    kind: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = (
        _other_config_checkpoint(tmp_path)
        if kind == "other configuration"
        else _file(tmp_path, "w.safetensors", b"{not a checkpoint")
    )
    out = tmp_path / "out"
    code, _, err = run(
        [
            "segment",
            *mask_prompts(data),
            "--query",
            data / "q0.png",
            "--out",
            out,
            "--checkpoint",
            checkpoint,
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and str(checkpoint) in err
    assert (
        "another configuration" if kind == "other configuration" else "not a safetensors"
    ) in err
    assert not out.exists()


def test_demo_end_to_end(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code, stdout, err = run(
        [
            "demo",
            "--out",
            out,
            "--checkpoint",
            tiny_checkpoint,
            "--shape",
            16,
            48,
            48,
            "--prompts",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert "promptseg" in stdout and "nearest-prompt baseline" in stdout and str(out) in stdout
    for name in ("phantom.nii.gz", "phantom_truth.nii.gz", "phantom_prediction.nii.gz"):
        assert nib.load(out / name).shape == (16, 48, 48)
    with Image.open(out / "phantom_overlay.png") as picture:
        picture.verify()
    assert (
        run(
            [
                "demo",
                "--out",
                out,
                "--checkpoint",
                tiny_checkpoint,
                "--shape",
                16,
                48,
                48,
                "--prompts",
                2,
            ],
            capsys,
        )[0]
        == 0
    )


def test_demo_without_packaged_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        "promptseg.cli.common.packaged_weights_path", lambda: tmp_path / "missing.safetensors"
    )
    code, _, err = run(["demo", "--out", tmp_path / "demo"], capsys)
    assert (
        code == 2
        and err.count("\n") == 1
        and "packaged weights not found" in err
        and "--checkpoint" in err
    )
    assert not (tmp_path / "demo").exists()


def test_contour_and_pictures() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    ring = contour(mask)
    assert ring.sum() == 16 and not ring[3, 3] and ring[1, 1]
    picture = overlay(np.arange(49, dtype=np.float32).reshape(7, 7), [(mask, RED)])
    assert (
        picture.shape == (7, 7, 3) and tuple(picture[1, 1]) == RED and tuple(picture[3, 3]) != RED
    )
    volume = torch.rand(30, 8, 9).numpy()
    grid = montage(volume, [(volume > 0.5, RED)], axis=0, max_slices=16, gap=2)
    assert grid.shape == (4 * 8 + 3 * 2, 4 * 9 + 3 * 2, 3)


def test_interrupt_exits_130_and_bugs_propagate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    def buggy(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("promptseg.cli.demo.run", interrupted)
    assert run(["demo"], capsys)[0] == 130
    monkeypatch.setattr("promptseg.cli.demo.run", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["demo"])
