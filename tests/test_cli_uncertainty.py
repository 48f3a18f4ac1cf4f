"""promptseg segment --uncertainty / --candidates and the bad-input cases of the ensemble options
(issue 13)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint, write_nifti, write_png  # noqa: F401  (fixture)
from PIL import Image

from promptseg.cli import main
from promptseg.engine.ensemble import MAX_ENSEMBLE

AFFINE = np.array(
    [[0.0, 0.0, 2.5, -40.0], [0.0, -1.2, 0.0, 30.0], [0.9, 0.0, 0.0, -7.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture
def cli_inputs(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """Prompt options (three PNG pairs), a PNG query and a NIfTI query with an oblique affine."""
    rng = np.random.default_rng(0)
    options = []
    for index in range(3):
        image, mask = disk_example(rng, (40, 48))
        options += [
            "--prompt",
            str(write_png(tmp_path / f"i{index}.png", image)),
            str(write_png(tmp_path / f"m{index}.png", mask)),
        ]
    image, _ = disk_example(rng, (44, 30))
    query = write_png(tmp_path / "q.png", image)
    volume = np.stack([disk_example(rng, (20, 24))[0] for _ in range(5)], axis=2).astype(np.float32)
    return options, query, write_nifti(tmp_path / "scan.nii.gz", volume, AFFINE)


def test_uncertainty_and_candidate_files_keep_the_query_shape_and_affine(
    tmp_path, tiny_checkpoint, cli_inputs
) -> None:  # noqa: F811
    options, query, scan = cli_inputs
    out = tmp_path / "out"
    common = [
        "segment",
        *options,
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert (
        main(
            common
            + [
                "--query",
                str(query),
                str(scan),
                "--uncertainty",
                "--ensemble",
                "3",
                "--candidates",
                "2",
            ]
        )
        == 0
    )
    for name in ("q_uncertainty.png", "q_variance.png", "q_candidate1.png", "q_candidate2.png"):
        assert np.asarray(Image.open(out / name)).shape == (44, 30), name
    source = nib.load(scan)
    for name in (
        "scan_uncertainty.nii.gz",
        "scan_variance.nii.gz",
        "scan_candidate1.nii.gz",
        "scan_candidate2.nii.gz",
    ):
        written = nib.load(out / name)
        assert written.shape == source.shape, name
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    entropy = np.asarray(nib.load(out / "scan_uncertainty.nii.gz").dataobj)
    assert entropy.dtype == np.float32 and 0.0 <= entropy.min() and entropy.max() <= 1.0
    assert not (out / "q_candidate3.png").exists()
    plain = tmp_path / "plain"
    assert main(common[:-1] + [str(plain), "--query", str(query), "--uncertainty"]) == 0
    assert (plain / "q_uncertainty.png").is_file() and not (plain / "q_variance.png").exists()


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--ensemble", "0"], "--ensemble"),
        (["--ensemble", str(MAX_ENSEMBLE + 1)], "--ensemble"),
        (["--adapt", "-1"], "--adapt"),
        (["--adapt", "501"], "--adapt"),
        (["--candidates", "2"], "--candidates"),
        (["--ensemble", "2", "--candidates", "3"], "--candidates"),
        (["--ensemble", "2", "--candidates", "-1"], "--candidates"),
    ],
)
def test_bad_ensemble_options_name_the_flag_and_write_nothing(
    tmp_path, tiny_checkpoint, cli_inputs, capsys, extra, flag
) -> None:  # noqa: F811
    options, query, _ = cli_inputs
    out = tmp_path / "bad"
    code = main(
        [
            "segment",
            *options,
            "--query",
            str(query),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_more_candidates_than_one_prompt_has_members_is_refused(
    tmp_path, tiny_checkpoint, cli_inputs, capsys
) -> None:  # noqa: F811
    options, query, _ = cli_inputs
    out = tmp_path / "bad"
    code = main(
        [
            "segment",
            *options[:3],
            "--query",
            str(query),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--no-progress",
            "--ensemble",
            "8",
            "--candidates",
            "6",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--candidates" in err and "only 4 ensemble members" in err
    assert not out.exists()
