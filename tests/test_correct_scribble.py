"""`promptseg segment --correct-scribble MASKFILE +|-` (issue 18): scribble files on the query's own
grid feed Segmenter.refine's scribbles; a file of another shape or grid is one line naming it."""

# ruff: noqa: F811 (the tiny_checkpoint fixture is imported from helpers)
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint, write_nifti, write_png  # noqa: F401 (fixture)
from PIL import Image

from promptseg.cli import main
from promptseg.data.synthetic import phantom_volume
from promptseg.engine.corrections import parse_scribble, read_scribble
from promptseg.errors import InputError


def run_cli(arguments: list) -> int:
    return main([str(a) for a in arguments])


@pytest.fixture()
def png_case(tmp_path: Path, tiny_checkpoint: Path) -> tuple[list, Path]:
    """The common arguments of a 2D segment run (one prompt, one 40 x 48 query) and its folder."""
    image, mask = disk_example(np.random.default_rng(1), (40, 48))
    write_png(tmp_path / "p.png", image)
    write_png(tmp_path / "p_mask.png", mask * 255)
    write_png(tmp_path / "q.png", image)
    common = ["segment", "--prompt", tmp_path / "p.png", tmp_path / "p_mask.png"]
    common += ["--query", tmp_path / "q.png", "--checkpoint", tiny_checkpoint]
    return common + ["--device", "cpu", "--no-progress"], tmp_path


def test_scribbles_add_and_remove_strokes_in_the_written_mask(png_case) -> None:
    common, folder = png_case
    assert run_cli(common + ["--out", folder / "plain"]) == 0
    plain = np.asarray(Image.open(folder / "plain" / "q_mask.png")) > 0
    add = np.zeros((40, 48), dtype=np.uint8)
    add[2:5, 2:12] = 255  # a stroke in a corner
    remove = np.zeros((40, 48), dtype=np.uint8)
    remove[plain] = 255  # over everything the model found
    remove[2:5, 2:12] = 0
    write_png(folder / "add.png", add)
    write_png(folder / "remove.png", remove)
    scribbles = ["--correct-scribble", folder / "add.png", "+"]
    scribbles += ["--correct-scribble", folder / "remove.png", "-"]
    assert run_cli(common + scribbles + ["--out", folder / "fixed"]) == 0
    fixed = np.asarray(Image.open(folder / "fixed" / "q_mask.png")) > 0
    assert fixed[2:5, 2:12].all() and not (fixed & (remove > 0)).any()
    # a click and a scribble together: the click first, then the scribble over it
    y, x = np.argwhere(remove > 0)[0]
    both = ["--correct", x, y, "+", "--correct-scribble", folder / "remove.png", "-"]
    assert run_cli(common + both + ["--out", folder / "both"]) == 0
    assert not np.asarray(Image.open(folder / "both" / "q_mask.png"))[y, x]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: write_png(f / "s.png", np.full((40, 40), 255, np.uint8)), "does not match"),
        (lambda f: write_png(f / "s.png", np.zeros((40, 48), np.uint8)), "holds no stroke"),
        (lambda f: f / "missing.png", "scribble file not found"),
    ],
)
def test_a_bad_scribble_file_is_one_line_naming_it(png_case, capsys, make, message) -> None:
    common, folder = png_case
    path = make(folder)
    assert run_cli(common + ["--correct-scribble", path, "+", "--out", folder / "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    assert not (folder / "o").exists()


def test_scribble_polarity_and_queries_are_checked_before_loading(png_case, capsys) -> None:
    common, folder = png_case
    write_png(folder / "s.png", np.full((40, 48), 255, np.uint8))
    assert run_cli(common + ["--correct-scribble", folder / "s.png", "x", "--out", folder / "o"])
    assert "--correct-scribble: expects MASKFILE then + or -" in capsys.readouterr().err
    write_png(folder / "q2.png", np.zeros((40, 48), np.uint8))
    twice = common + ["--query", folder / "q.png", folder / "q2.png"]
    twice += ["--correct-scribble", folder / "s.png", "+"]
    assert run_cli(twice + ["--out", folder / "o"]) == 2
    assert "--correct-scribble: corrects one query" in capsys.readouterr().err
    assert not (folder / "o").exists()


def test_volume_scribbles_are_in_the_stored_grid(tmp_path: Path, tiny_checkpoint: Path) -> None:
    volume, labels = phantom_volume(np.random.default_rng(3), (24, 32, 32))
    volume, labels = np.moveaxis(volume, 0, 2).copy(), np.moveaxis(labels, 0, 2).copy()
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    query = write_nifti(tmp_path / "scan.nii.gz", volume.astype(np.float32), affine)
    atlas = write_nifti(tmp_path / "atlas.nii.gz", volume.astype(np.float32))
    atlas_labels = write_nifti(tmp_path / "atlas_labels.nii.gz", labels)
    strokes = np.zeros(volume.shape, dtype=np.uint8)
    strokes[1:3, 1:3, 5:9] = 1
    write_nifti(tmp_path / "add.nii.gz", strokes, affine)
    common = ["segment", "--prompt-volume", atlas, atlas_labels, "--prompt-slices", "4"]
    common += ["--label", "1", "--query", query, "--checkpoint", tiny_checkpoint]
    common += ["--device", "cpu", "--no-progress", "--correct-scribble"]
    assert run_cli(common + [tmp_path / "add.nii.gz", "+", "--out", tmp_path / "o"]) == 0
    written = np.asarray(nib.load(tmp_path / "o" / "scan_mask.nii.gz").dataobj)
    assert written[1:3, 1:3, 5:9].all()
    flat = write_png(tmp_path / "flat.png", np.full(volume.shape[:2], 255, np.uint8))
    with pytest.raises(InputError, match="does not match the query's"):
        read_scribble(str(flat), volume.shape, affine)
    elsewhere = write_nifti(tmp_path / "moved.nii.gz", strokes, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert run_cli(common + [elsewhere, "+", "--out", tmp_path / "m"]) == 2
    assert not (tmp_path / "m").exists()
    with pytest.raises(InputError, match="moved.nii.gz: scribble's affine differs"):
        read_scribble(str(elsewhere), volume.shape, affine)


def test_parse_scribble() -> None:
    assert parse_scribble(["a.png", "+"]) == ("a.png", True)
    assert parse_scribble(["a.png", "-"]) == ("a.png", False)
    with pytest.raises(InputError, match="--correct-scribble"):
        parse_scribble(["a.png", "plus"])
