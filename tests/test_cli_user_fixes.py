"""What a new user tripped on (issue 14): each CLI fix checked through `promptseg.cli.main`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import disk_example, tiny_checkpoint, write_disk_dataset, write_png  # noqa: F401 (fixture)
from PIL import Image

from promptseg.cli import build_parser, main
from promptseg.cli.commands import COMMANDS
from promptseg.engine.legend import LINE, MARGIN, SWATCH, legend_size, with_legend
from promptseg.engine.overlay import GREEN, RED
from promptseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]


class Stop(InputError):
    """Raised by a stand-in for build_tasks, to end a command once its arguments are seen."""


def record_axis(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace build_tasks in the train and eval commands by one that records its axis and stops."""
    seen: list[int] = []

    def fake_build_tasks(*args: object, axis: int = -1, **kwargs: object) -> list:
        seen.append(axis)
        raise Stop("--data", "stopped by the test")

    for module in ("promptseg.cli.train", "promptseg.cli.eval"):
        monkeypatch.setattr(f"{module}.build_tasks", fake_build_tasks)
    return seen


@pytest.mark.parametrize("given, expected", [([], 2), (["--axis", "0"], 0), (["--axis", "1"], 1)])
def test_train_and_eval_slice_along_axis(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    given: list[str],
    expected: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = record_axis(monkeypatch)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    train = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    evaluate = ["eval", "--data", str(data), "--methods", "nearest_prompt", "--no-progress"]
    assert main(train + given) == 2
    assert main(evaluate + given) == 2
    assert seen == [expected, expected]
    assert capsys.readouterr().err.count("stopped by the test") == 2


def test_axis_outside_0_to_2_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), "--axis", "3"]) == 2
    assert "--axis: invalid choice: 3" in capsys.readouterr().err


@pytest.fixture
def prompt_files(tmp_path: Path) -> dict[str, Path]:
    """A prompt image, its 0/255 mask, an all-zero mask and a query (40x48 PNGs)."""
    rng = np.random.default_rng(0)
    image, mask = disk_example(rng, (40, 48))
    return {
        "image": write_png(tmp_path / "p.png", image),
        "mask": write_png(tmp_path / "p_mask.png", mask * 255),
        "empty": write_png(tmp_path / "empty.png", np.zeros((40, 48), np.uint8)),
        "query": write_png(tmp_path / "q.png", disk_example(rng, (40, 48))[0]),
    }


def segment(
    files: dict[str, Path], mask: str, checkpoint: Path, out: Path, *extra: str
) -> list[str]:
    return [
        "segment",
        "--prompt",
        str(files["image"]),
        str(files[mask]),
        "--query",
        str(files["query"]),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--no-progress",
        *extra,
    ]


def test_a_grayscale_image_as_a_mask_is_refused_without_label(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert main(segment(prompt_files, "image", tiny_checkpoint, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"promptseg: error: {prompt_files['image']}: holds "
    )
    assert "looks like a grayscale image" in err and "--label N" in err and not out.exists()
    value = int(np.array(Image.open(prompt_files["image"])).max())
    assert main(segment(prompt_files, "image", tiny_checkpoint, out, "--label", str(value))) == 0


@pytest.mark.parametrize("label", [[], ["--label", "1"], ["--label", "255"]])
def test_an_empty_prompt_mask_warns_alike_with_or_without_label(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    label: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(segment(prompt_files, "empty", tiny_checkpoint, tmp_path / "out", *label)) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"promptseg: warning: {prompt_files['empty']}: empty prompt mask"
    )
    assert (tmp_path / "out" / "q_mask.png").is_file()


def test_a_label_absent_from_a_mask_of_other_labels_is_still_an_error(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(segment(prompt_files, "mask", tiny_checkpoint, tmp_path / "out", "--label", "7")) == 2
    )
    assert (
        "requested label 7 is absent from the mask (labels present: [255])"
        in capsys.readouterr().err
    )


NO_TRITON_ON_CPU = """
import sys
sys.modules["triton"] = None  # as in a CPU install, which has no triton: any import of it fails
import numpy as np
import promptseg.cli
from promptseg import Segmenter
from promptseg.kernels import triton_available
promptseg.cli.build_parser()
seg = Segmenter.from_pretrained(device="cpu")
image = np.zeros((32, 32), np.uint8)
image[8:20, 8:20] = 200
print("shape:", seg.segment([image], seg.encode_prompts([image], [image > 0])).shape)
print("kernels:", sorted(m for m in sys.modules if m.startswith("promptseg.kernels.triton")))
print("reason:", triton_available("cpu")[1])
"""


def test_the_cpu_path_runs_without_triton() -> None:
    """triton is in the gpu and test extras only: without it the CLI parser and a CPU segmentation
    work, no Triton kernel module is loaded, and the triton backend says how to get it. (torch
    itself imports triton where it is installed, when torch._dynamo loads.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TRITON_ON_CPU],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "shape: (1, 32, 32)" in done.stdout and "kernels: []" in done.stdout
    assert (
        "reason: triton is not installed (it comes with pip install 'promptseg[gpu]')"
        in done.stdout
    )


def option_help(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, str]]:
    """Option name -> (its action, its help as printed) for every option of `parser`."""
    formatter = parser._get_formatter()
    return {
        action.option_strings[-1]: (action, formatter._expand_help(action) if action.help else "")
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(COMMANDS)
    for name, command in commands.choices.items():
        for option, (action, text) in option_help(command).items():
            assert text.strip(), f"promptseg {name} {option} has no help text"
            has_default = not (
                action.default is None or action.default is False or action.default == []
            )
            if has_default:
                assert "default" in text.lower(), f"promptseg {name} {option} hides its default"
    threshold = option_help(commands.choices["segment"])["--threshold"][1]
    assert threshold.endswith("(default: 0.5)")
    assert option_help(commands.choices["eval"])["--shots"][1].endswith("(default: 1 2 4 8 16)")


def test_help_lists_the_commands_without_importing_torch() -> None:
    code = (
        "import sys\nfrom promptseg.cli import main\ncode = main(['--help'])\n"
        "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] == 'torch'"
        " or m.startswith('promptseg.cli.') and m != 'promptseg.cli.commands'))\nsys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout
    for name, command in COMMANDS.items():
        assert name in done.stdout and command.help.split()[0] in done.stdout


def test_train_without_progress_says_where_the_run_goes_and_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "tiny_test.yaml"),
                "--out",
                str(run),
                "--steps",
                "2",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("training to step 2 on 0 dataset tasks") and lines[0].endswith(
        str(run)
    )
    assert lines[1].startswith("trained to step 2") and lines[1].endswith(
        str(run / "final.safetensors")
    )


def test_with_legend_names_each_colour_below_the_picture() -> None:
    picture = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    entries = [("truth", GREEN), ("prediction", RED)]
    shown = with_legend(picture, entries)
    height, width = legend_size(entries)
    assert shown.shape == (30 + height, max(20, width), 3) and width > 20  # the names widen it
    np.testing.assert_array_equal(shown[:30, :20], picture)
    for n, (_, colour) in enumerate(entries):
        top = 30 + MARGIN + n * LINE
        swatch = shown[top + 2 : top + 2 + SWATCH, MARGIN : MARGIN + SWATCH]
        assert (swatch == colour).all(), f"swatch {n} is not {colour}"
        text = shown[top : top + LINE, MARGIN + SWATCH + 4 :]
        assert (text.max(axis=-1) > 128).sum() > 10, f"no name beside swatch {n}"


def test_segment_overlay_carries_its_legend(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    out = tmp_path / "out"
    assert main(segment(prompt_files, "mask", tiny_checkpoint, out, "--overlay")) == 0
    shown = np.asarray(Image.open(out / "q_overlay.png"))
    assert shown.shape[0] == 40 + legend_size([("prediction", RED)])[0]
    top = 40 + MARGIN
    assert (shown[top + 2 : top + 2 + SWATCH, MARGIN : MARGIN + SWATCH] == RED).all()


def test_eval_plot_without_matplotlib_fails_before_scoring(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = __import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_matplotlib)
    plot = tmp_path / "dice.png"
    assert main(["eval", "--data", str(tmp_path / "nowhere"), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert (
        err == "promptseg: error: --plot: charts need matplotlib: pip install 'promptseg[plot]'\n"
    )
    assert not plot.exists()


@pytest.fixture
def disk_folder(tmp_path: Path) -> Path:
    """A simple-layout dataset of 6 grey disk images."""
    return write_disk_dataset(tmp_path / "disks", 6)


def test_a_one_channel_model_trains_and_evaluates_on_one_channel_episodes(
    tmp_path: Path, disk_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The episodes follow the config's in_channels (they used to be three channels always)."""
    config = tmp_path / "grey.yaml"
    tiny = (REPO / "configs" / "tiny_test.yaml").read_text()
    config.write_text(
        tiny.replace("model:\n", "model:\n  in_channels: 1\n").replace(
            "synthetic_fraction: 1.0", "synthetic_fraction: 0.5"
        )
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(disk_folder),
                "--config",
                str(config),
                "--out",
                str(run),
                "--steps",
                "2",
                "--no-progress",
                "--device",
                "cpu",
                "--val-data",
                str(disk_folder),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--data",
                str(disk_folder),
                "--checkpoint",
                str(run / "final.safetensors"),
                "--shots",
                "1",
                "--episodes",
                "1",
                "--queries",
                "1",
                "--methods",
                "promptseg",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "disks/" in capsys.readouterr().out


def test_episode_images_have_the_channels_asked_for() -> None:
    from promptseg.data.episodes import EpisodeSampler, fixed_episodes
    from promptseg.data.synthetic import synthetic_task

    task = synthetic_task(np.random.default_rng(0), 32, 6, channels=1)
    for channels in (1, 3):
        sampler = EpisodeSampler([task], 32, shots=(2, 2), queries=1, channels=channels)
        episode = sampler.sample_episode(np.random.default_rng(1), 2)
        assert (
            episode.prompt_images.shape[1] == channels and episode.query_images.shape[1] == channels
        )
        fixed = fixed_episodes(task, shots=2, queries=1, count=1, seed=0, channels=channels)[0]
        assert fixed.prompt_images.shape[1] == channels


def test_eval_shots_are_bounded_by_the_model_prompt_limit(
    tmp_path: Path, disk_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The limit is the checkpoint's max_prompts (it used to be 64 written into cli/eval.py)."""
    import dataclasses

    from helpers import TINY_CONFIG, save_weights  # save_weights: wherever the weights module is

    from promptseg.model import PromptSegNet

    weights = tmp_path / "k8.safetensors"
    save_weights(PromptSegNet(dataclasses.replace(TINY_CONFIG, max_prompts=8)), weights)
    common = [
        "eval",
        "--data",
        str(disk_folder),
        "--checkpoint",
        str(weights),
        "--episodes",
        "1",
        "--queries",
        "1",
        "--methods",
        "nearest_prompt",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(common + ["--shots", "1", "9"]) == 2
    assert capsys.readouterr().err == (
        "promptseg: error: --shots: each K must lie in 1..8 (the model's "
        "prompt limit), got [1, 9]\n"
    )
    assert main(common + ["--shots", "0"]) == 2
    assert "--shots: each K must be positive, got [0]" in capsys.readouterr().err
    assert main(common + ["--shots", "1"]) == 0


def test_a_npy_volume_is_a_volume_for_the_api_and_the_cli_alike(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One rule (promptseg.data.volumes): an (X, Y, Z) .npy is segmented as a volume by both, a
    (C, H, W) .npy is a 2D image for both (the CLI used to refuse .npy volumes)."""
    import nibabel as nib

    from promptseg import Segmenter
    from promptseg.data.volumes import has_volume_outputs, is_volume_shape

    rng = np.random.default_rng(3)
    volume, image = tmp_path / "vol.npy", tmp_path / "chw.npy"
    np.save(volume, rng.integers(0, 255, (40, 48, 6)).astype(np.uint8))
    np.save(image, rng.integers(0, 255, (3, 40, 48)).astype(np.uint8))
    assert has_volume_outputs(volume) and not has_volume_outputs(image)
    assert is_volume_shape((40, 48, 6), False) and not is_volume_shape((40, 48, 3), False)
    assert is_volume_shape((40, 48, 3), True) and not is_volume_shape((40, 48), True)

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    prompts = segmenter.encode_prompts([str(prompt_files["image"])], [str(prompt_files["mask"])])
    api = segmenter.segment_volume(str(volume), prompts, axis=2)
    assert api.probabilities.shape == (40, 48, 6)
    with pytest.raises(InputError, match=r"chw.npy: expected a 3D volume, got shape \(3, 40, 48\)"):
        segmenter.segment_volume(str(image), prompts)
    assert segmenter.segment([str(image)], prompts).shape == (1, 40, 48)

    out = tmp_path / "out"
    argv = [
        "segment",
        "--prompt",
        str(prompt_files["image"]),
        str(prompt_files["mask"]),
        "--query",
        str(volume),
        str(image),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--save-probabilities",
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    cli = np.asarray(nib.load(out / "vol_prob.nii.gz").dataobj)
    np.testing.assert_allclose(cli, api.probabilities, atol=1e-6)
    assert np.load(out / "chw_prob.npy").shape == (40, 48)


def test_segment_reads_and_prepares_each_query_once(
    prompt_files: dict[str, Path],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Validation reads every query before anything is written, and segmentation reuses what it
    read (within cli.segment.KEPT_QUERY_BYTES); each image is prepared (resized) for the model once:
    here the prompt image and the two queries."""
    import promptseg.cli.segment as segment_command
    import promptseg.data.preprocess as preprocess

    reads: list[str] = []
    resized: list[tuple[int, ...]] = []
    read_input, resize_image = segment_command.read_input, preprocess.resize_image

    def counting_read(path: str, series: str | None = None) -> object:
        reads.append(str(path))
        return read_input(path, series)

    def counting_resize(image: torch.Tensor, size: object) -> torch.Tensor:
        resized.append(tuple(image.shape))
        return resize_image(image, size)

    monkeypatch.setattr(segment_command, "read_input", counting_read)
    monkeypatch.setattr(preprocess, "resize_image", counting_resize)
    queries = [str(prompt_files["query"]), str(prompt_files["empty"])]
    argv = [
        "segment",
        "--prompt",
        str(prompt_files["image"]),
        str(prompt_files["mask"]),
        "--query",
        *queries,
        "--out",
        str(tmp_path / "out"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert sorted(reads) == sorted(queries) and len(resized) == 3
    monkeypatch.setattr(
        segment_command, "KEPT_QUERY_BYTES", 0
    )  # nothing kept: headers checked first, each query read once, when segmented
    reads.clear(), resized.clear()
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(reads) == sorted(queries) and len(resized) == 3
