"""What a new user tripped on (issue 14): each CLI fix checked through `promptseg.cli.main`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import disk_example, tiny_checkpoint, write_png  # noqa: F401 (fixture)

from promptseg.cli import main
from promptseg.errors import InputError


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
def test_train_and_eval_slice_along_axis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         given: list[str], expected: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
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


def test_axis_outside_0_to_2_is_a_usage_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), "--axis", "3"]) == 2
    assert "--axis: invalid choice: 3" in capsys.readouterr().err


@pytest.fixture
def prompt_files(tmp_path: Path) -> dict[str, Path]:
    """A prompt image, its 0/255 mask, an all-zero mask and a query (40x48 PNGs)."""
    rng = np.random.default_rng(0)
    image, mask = disk_example(rng, (40, 48))
    return {"image": write_png(tmp_path / "p.png", image),
            "mask": write_png(tmp_path / "p_mask.png", mask * 255),
            "empty": write_png(tmp_path / "empty.png", np.zeros((40, 48), np.uint8)),
            "query": write_png(tmp_path / "q.png", disk_example(rng, (40, 48))[0])}


def segment(files: dict[str, Path], mask: str, checkpoint: Path, out: Path,
            *extra: str) -> list[str]:
    return ["segment", "--prompt", str(files["image"]), str(files[mask]), "--query",
            str(files["query"]), "--out", str(out), "--checkpoint", str(checkpoint),
            "--no-progress", *extra]


def test_a_grayscale_image_as_a_mask_is_refused_without_label(
        prompt_files: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(segment(prompt_files, "image", tiny_checkpoint, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"promptseg: error: {prompt_files['image']}: holds ")
    assert "looks like a grayscale image" in err and "--label N" in err and not out.exists()
    value = int(np.array(Image.open(prompt_files["image"])).max())
    assert main(segment(prompt_files, "image", tiny_checkpoint, out, "--label", str(value))) == 0


@pytest.mark.parametrize("label", [[], ["--label", "1"], ["--label", "255"]])
def test_an_empty_prompt_mask_warns_alike_with_or_without_label(
        prompt_files: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path,  # noqa: F811
        label: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(segment(prompt_files, "empty", tiny_checkpoint, tmp_path / "out", *label)) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"promptseg: warning: {prompt_files['empty']}: "
                                                   "empty prompt mask")
    assert (tmp_path / "out" / "q_mask.png").is_file()


def test_a_label_absent_from_a_mask_of_other_labels_is_still_an_error(
        prompt_files: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(segment(prompt_files, "mask", tiny_checkpoint, tmp_path / "out", "--label", "7")) == 2
    assert "requested label 7 is absent from the mask (labels present: [255])" in capsys.readouterr().err

