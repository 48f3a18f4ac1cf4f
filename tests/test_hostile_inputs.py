"""Hostile inputs (issue 6): random shapes and data types, NaN and Inf, constant images, one-pixel
and empty masks, extreme aspect ratios, truncated or corrupt PNG / NIfTI / NumPy files, NIfTI with
odd affines or a fourth dimension, and pickle-bearing .npy files.

Every case must end in a correct result (right shape, finite probabilities in [0, 1], output files
present) or one PromptSegError line naming the input (CLI: exit 2, one stderr line, no output file):
never a traceback, a hang or a partial output. The examples run are counted per property in CASES
and reported by the last test of this module.
"""

from __future__ import annotations

import contextlib
import gzip
import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import disk_example, tiny_checkpoint, write_png  # noqa: F401 (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from promptseg.cli import main
from promptseg.data.io import read_image, read_label
from promptseg.engine.legend import legend_size
from promptseg.engine.overlay import RED
from promptseg.engine.prompts_input import Prompt
from promptseg.engine.segmenter import Segmenter
from promptseg.errors import InputError, PromptSegError
from promptseg.torch_threads import single_torch_thread

CASES: Counter[str] = Counter()
HANG_LIMIT_S = 60.0

# A normal example takes well under a second; the deadline flags pathological slowness (e.g. a huge
# allocation) without failing on two busy cores, and time_limit turns a true hang into a failure.
COMMON = {
    "deadline": timedelta(seconds=20),
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


class Hang(BaseException):
    """Raised when an example runs past HANG_LIMIT_S (a BaseException, so no `except Exception`
    hides it)."""


@contextlib.contextmanager
def time_limit(seconds: float = HANG_LIMIT_S) -> Iterator[None]:
    """Fail the block with Hang if it runs longer than `seconds` (SIGALRM, main thread)."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(error: PromptSegError, names: str | None = None) -> None:
    """A user-facing error: one non-empty line, naming `names` when given."""
    message = str(error)
    assert message and "\n" not in message, message
    if names is not None:
        assert names in message, message


def assert_probabilities(probabilities: np.ndarray, shape: tuple[int, ...]) -> None:
    assert probabilities.shape == shape and probabilities.dtype == np.float32
    assert (
        np.all(np.isfinite(probabilities))
        and probabilities.min() >= 0.0
        and probabilities.max() <= 1.0
    )


# --------------------------------------------------------------------------------------------------
# Generated arrays


@dataclass
class Array:
    """A generated image array and whether all of its values are finite."""

    data: np.ndarray
    finite: bool


SHAPES_2D = st.one_of(
    st.tuples(st.integers(1, 48), st.integers(1, 48)),
    st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 2000), (2000, 2), (3, 300), (1, 2)]),
)
KINDS = ("int16_ct", "float64", "float32", "uint8", "uint8_rgb", "uint8_rgba", "uint16", "bool")
CONTENTS = ("noise", "constant", "one_pixel", "extreme")
POISONS = (None, None, None, "nan", "inf", "-inf")


def build_array(
    kind: str, shape: tuple[int, ...], content: str, poison: str | None, seed: int
) -> Array:
    """An array of `kind` (channels appended for RGB(A)) filled per `content`, a few values
    `poison`ed."""
    rng = np.random.default_rng(seed)
    if kind == "uint8_rgb":
        shape = (*shape, 3)
    elif kind == "uint8_rgba":
        shape = (*shape, 4)
    low, high = {
        "int16_ct": (-1024, 3071),
        "float64": (-5.0, 5.0),
        "float32": (0.0, 1.0),
        "uint16": (0, 65535),
        "bool": (0, 1),
    }.get(kind, (0, 255))
    if content == "noise":
        values = rng.uniform(low, high, shape)
    elif content == "constant":
        values = np.full(shape, rng.uniform(low, high))
    elif content == "one_pixel":
        values = np.full(shape, low, dtype=np.float64)
        values[tuple(rng.integers(0, n) for n in shape)] = high
    else:  # extreme: the limits of the type (float64: beyond float32's range)
        extremes = {
            "int16_ct": (-32768, 32767),
            "float64": (-1e300, 1e300),
            "float32": (-3e38, 3e38),
        }.get(kind, (low, high))
        values = rng.choice(np.asarray(extremes, dtype=np.float64), size=shape)
    dtype = {
        "int16_ct": np.int16,
        "float64": np.float64,
        "float32": np.float32,
        "uint16": np.uint16,
        "bool": bool,
    }.get(kind, np.uint8)
    data = (values > 0.5) if kind == "bool" else values.astype(dtype)
    finite = True
    if poison is not None and data.dtype.kind == "f":
        data[tuple(rng.integers(0, n) for n in shape)] = {
            "nan": np.nan,
            "inf": np.inf,
            "-inf": -np.inf,
        }[poison]
        finite = False
    return Array(data, finite)


@st.composite
def arrays(
    draw: st.DrawFn, shapes: st.SearchStrategy = SHAPES_2D, kinds: tuple[str, ...] = KINDS
) -> Array:
    return build_array(
        draw(st.sampled_from(kinds)),
        draw(shapes),
        draw(st.sampled_from(CONTENTS)),
        draw(st.sampled_from(POISONS)),
        draw(st.integers(0, 2**32 - 1)),
    )


# --------------------------------------------------------------------------------------------------
# Generated files


AFFINES = ("identity", "negative", "huge", "rotated", "singular", "rank_deficient", "nan")


def affine_of(kind: str) -> np.ndarray:
    """A 4x4 voxel-to-world matrix of `kind`, some of which nibabel cannot express as a qform."""
    matrices = {
        "identity": np.eye(4),
        "negative": np.diag([-1.0, -2.5, -0.5, 1.0]),
        "huge": np.diag([1e30, 1e30, 1e30, 1.0]),
        "rotated": np.array(
            [[0.0, -0.8, 0.0, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1.0]]
        ),
        "singular": np.diag([1.0, 1.0, 0.0, 1.0]),
        "rank_deficient": np.array(
            [[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
        ),
        "nan": np.diag([np.nan, 1.0, 1.0, 1.0]),
    }
    return matrices[kind]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write `data` with `affine` stored verbatim in the sform (nibabel would refuse to derive a
    qform from some of them), as a real scanner or a hostile tool could."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))


@dataclass
class Damage:
    """Truncation at a fraction of the file and bytes XOR-ed at fractional positions (absent:
    intact)."""

    truncate_at: float | None
    flips: list[tuple[float, int]]

    @property
    def intact(self) -> bool:
        return self.truncate_at is None and not self.flips

    def apply(self, path: Path) -> None:
        blob = bytearray(path.read_bytes())
        for where, mask in self.flips:
            blob[int(where * len(blob))] ^= mask
        if self.truncate_at is not None:
            blob = blob[: int(self.truncate_at * len(blob))]
        path.write_bytes(bytes(blob))


damages = st.one_of(
    st.just(Damage(None, [])),
    st.builds(Damage, st.floats(0.0, 0.999), st.just([])),
    st.builds(
        Damage,
        st.none(),
        st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), min_size=1, max_size=4),
    ),
    # NIfTI and PNG headers sit in the first few hundred bytes: damage them more often
    st.builds(
        Damage,
        st.none(),
        st.lists(st.tuples(st.floats(0.0, 0.05), st.integers(1, 255)), min_size=1, max_size=3),
    ),
)


@dataclass
class FileCase:
    """A file on disk, what was written to it (before any damage) and whether a reader must accept
    it."""

    path: Path
    array: np.ndarray
    affine: np.ndarray | None
    intact: bool
    valid_image: bool
    finite: bool


@st.composite
def files(draw: st.DrawFn, folder: Path) -> FileCase:
    """A PNG, NumPy or NIfTI file under `folder`, possibly damaged."""
    fmt = draw(st.sampled_from(["png", "npy", "nii", "nii.gz"]))
    damage = draw(damages)
    path = folder / f"input.{fmt}"
    affine = None
    if fmt == "png":
        generated = draw(arrays(kinds=("uint8", "uint8_rgb", "uint8_rgba", "uint16")))
        Image.fromarray(generated.data).save(path)
        valid = True
    elif fmt == "npy":
        generated = draw(arrays())
        np.save(path, generated.data)
        valid = True
    else:
        shape = draw(
            st.one_of(
                st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6)),
                st.tuples(
                    st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.integers(1, 2)
                ),
            )
        )
        generated = draw(
            arrays(shapes=st.just(shape), kinds=("int16_ct", "float64", "float32", "uint8"))
        )
        affine = affine_of(draw(st.sampled_from(AFFINES)))
        save_nifti(path, generated.data, affine)
        valid = len(shape) == 3 or shape[3] == 1
    damage.apply(path)
    return FileCase(path, generated.data, affine, damage.intact, valid, generated.finite)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Intra-op threads only slow the tiny model down on 2 busy cores; results do not depend on
    them."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint: Path) -> Segmenter:  # noqa: F811
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=8)


@pytest.fixture(scope="module")
def disk_prompts(segmenter: Segmenter):
    """Two prompt pairs of noisy disks, encoded once."""
    rng = np.random.default_rng(0)
    images, masks = zip(*(disk_example(rng, (40, 48)) for _ in range(2)))
    return segmenter.encode_prompts(list(images), list(masks))


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """CLI arguments of one good --prompt pair (PNG image and 0/255 mask)."""
    root = tmp_path_factory.mktemp("prompts")
    image, mask = disk_example(np.random.default_rng(1), (40, 48))
    return [
        "--prompt",
        str(write_png(root / "p.png", image)),
        str(write_png(root / "p_mask.png", mask * 255)),
    ]


# --------------------------------------------------------------------------------------------------
# Readers


@settings(max_examples=250, **COMMON)
@given(data=st.data())
def test_readers_return_valid_arrays_or_one_line_errors(data: st.DataObject) -> None:
    """read_image / read_label on intact and damaged files: the written array back, or one line
    naming the file."""
    CASES["readers"] += 1
    with tempfile.TemporaryDirectory() as folder, time_limit():
        case = data.draw(files(Path(folder)))
        try:
            image = read_image(case.path)
        except PromptSegError as error:
            assert_one_line_error(error, str(case.path))
            assert not (case.intact and case.valid_image), f"intact, valid file refused: {error}"
        else:
            assert (
                image.array.ndim in (2, 3) and image.array.size and image.array.dtype.kind in "biuf"
            )
            if case.intact:
                expected = case.array[..., 0] if case.array.ndim == 4 else case.array
                np.testing.assert_array_equal(image.array, expected)
                if case.affine is not None:
                    np.testing.assert_array_equal(image.affine, case.affine.astype(np.float32))
        try:
            label = read_label(case.path)
        except PromptSegError as error:
            assert_one_line_error(error, str(case.path))
        else:
            assert label.array.dtype.kind == "u" and label.array.ndim in (2, 3)
            if case.intact:  # the same values (one channel of an RGB map with equal channels)
                expected = case.array[..., 0] if case.array.ndim == 4 else case.array
                expected = expected if expected.ndim == label.array.ndim else expected[..., 0]
                np.testing.assert_array_equal(label.array, expected)


class Explosive:
    """Unpickling an Explosive creates the file at `marker` (proof that a pickle was executed)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    """An object-dtype .npy whose pickle would create a marker file is refused; the pickle never
    runs."""
    marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = Explosive(str(marker))
    np.save(tmp_path / "evil.npy", payload, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", image=payload)
    for name in ("evil.npy", "evil.npz"):
        for reader in (read_image, read_label):
            with pytest.raises(InputError, match=f"{name}: unreadable or corrupt image") as caught:
                reader(tmp_path / name)
            assert_one_line_error(caught.value)
    assert not marker.exists()
    np.load(
        tmp_path / "evil.npy", allow_pickle=True
    )  # the payload is live: unpickling does create the marker
    assert marker.exists()


def test_nifti_header_claiming_more_data_than_the_file_holds(tmp_path: Path) -> None:
    """A header claiming 512 MiB of voxels in a file of a few hundred bytes is refused before
    allocating them."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 256))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + bytes(4 + 64)  # no extensions, then 64 bytes of voxels
    for name, blob in (("claims.nii", raw), ("claims.nii.gz", gzip.compress(raw))):
        (tmp_path / name).write_bytes(blob)
        with (
            time_limit(20),
            pytest.raises(InputError, match="header claims 536870912 bytes") as caught,
        ):
            read_image(tmp_path / name)
        assert_one_line_error(caught.value, str(tmp_path / name))


# --------------------------------------------------------------------------------------------------
# Segmenter


@settings(max_examples=150, **COMMON)
@given(query=arrays())
def test_segment_gives_probabilities_or_a_non_finite_error(
    segmenter: Segmenter, disk_prompts, query: Array
) -> None:
    """Any bool / integer / float query of any size: (H, W) probabilities, or InputError for NaN /
    Inf only."""
    CASES["segment"] += 1
    with time_limit():
        if not query.finite:
            with pytest.raises(
                InputError, match="query 0: image contains non-finite intensities"
            ) as caught:
                segmenter.segment([query.data], disk_prompts)
            assert_one_line_error(caught.value)
            return
        probabilities = segmenter.segment([query.data], disk_prompts)
    assert_probabilities(probabilities, (1, *query.data.shape[:2]))


def _rounded_span(a: float, b: float, size: int) -> bool:
    """Whether the inclusive pixel span [round(a), round(b)] (either order) meets 0..size-1, as
    rasterize_box rounds."""
    return round(min(a, b)) <= size - 1 and round(max(a, b)) >= 0


@st.composite
def prompts(draw: st.DrawFn) -> tuple[Prompt, set[str | None]]:
    """A prompt of any kind on a generated image, and the allowed outcomes: None (encodes) or a
    phrase of the InputError. Coordinates are checked before intensities, so a bad click wins over a
    NaN image."""
    image = draw(arrays())
    height, width = image.data.shape[:2]
    kind = draw(st.sampled_from(["mask", "click", "box", "scribble"]))
    coordinate = st.one_of(st.floats(-50, 2100), st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind in ("mask", "scribble"):
        style = draw(st.sampled_from(["empty", "one_pixel", "random", "full"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mask = np.zeros((height, width), np.uint8)
        if style == "full":
            mask[:] = 1
        elif style == "random":
            mask = rng.integers(0, 2, (height, width)).astype(np.uint8)
        elif style == "one_pixel":
            mask[rng.integers(0, height), rng.integers(0, width)] = 1
        value, allowed = Prompt(image=image.data, kind=kind, mask=mask, name="generated"), {None}
    elif kind == "click":
        points = draw(st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=3))
        reach = max(2.0, min(height, width) / 32.0)  # the click disk radius
        if not np.all(np.isfinite(points)):
            allowed = {"must be finite"}
        elif any(0 <= x <= width - 1 and 0 <= y <= height - 1 for x, y in points):
            allowed = {None}
        elif all(min(x, width - 1 - x, y, height - 1 - y) < -reach - 1 for x, y in points):
            allowed = {"lies outside"}
        else:  # within a radius of the border: the disk may or may not cover a pixel centre
            allowed = {None, "lies outside"}
        value = Prompt(image=image.data, kind="click", points=points, name="generated")
    else:
        box = draw(st.tuples(coordinate, coordinate, coordinate, coordinate))
        if not np.all(np.isfinite(box)):
            allowed = {"must be finite"}
        else:
            x0, y0, x1, y1 = box
            allowed = (
                {None}
                if _rounded_span(x0, x1, width) and _rounded_span(y0, y1, height)
                else {"lies outside"}
            )
        value = Prompt(image=image.data, kind="box", box=box, name="generated")
    if not image.finite and None in allowed:
        allowed = (allowed - {None}) | {"non-finite intensities"}
    return value, allowed


@settings(max_examples=120, **COMMON)
@given(prompt=prompts())
def test_encode_prompts_accepts_or_explains(
    segmenter: Segmenter, prompt: tuple[Prompt, set[str | None]]
) -> None:
    """Masks (empty, one pixel, full), clicks and boxes anywhere (NaN, Inf, outside) on any image:
    an encoding that segments a query, or one InputError line saying what is wrong."""
    CASES["encode_prompts"] += 1
    value, allowed = prompt
    with time_limit(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "empty prompt mask" is a warning, not an error
        try:
            encoded = segmenter.encode_prompts([value])
        except InputError as error:
            assert_one_line_error(error, "generated")
            assert any(phrase and phrase in str(error) for phrase in allowed), (allowed, str(error))
            return
        assert None in allowed, f"expected an error containing one of {allowed}"
        assert_probabilities(segmenter.segment([np.zeros((5, 7), np.uint8)], encoded), (1, 5, 7))


VOLUME_SHAPES = st.one_of(
    st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10)),
    st.sampled_from([(1, 1, 40), (2, 300, 3), (40, 1, 1), (1, 2, 1)]),
)


@settings(max_examples=80, **COMMON)
@given(
    volume=arrays(shapes=VOLUME_SHAPES, kinds=("int16_ct", "float64", "float32", "uint8", "bool")),
    axis=st.integers(0, 2),
)
def test_segment_volume_keeps_the_grid_or_refuses_non_finite(
    segmenter: Segmenter, disk_prompts, volume: Array, axis: int
) -> None:
    """A volume of any shape and type: probabilities in its grid that match segmenting each slice
    alone."""
    CASES["segment_volume"] += 1
    with time_limit():
        if not volume.finite:
            with pytest.raises(
                InputError, match="volume: volume contains non-finite intensities"
            ) as caught:
                segmenter.segment_volume(volume.data, disk_prompts, axis=axis)
            assert_one_line_error(caught.value)
            return
        result = segmenter.segment_volume(volume.data, disk_prompts, axis=axis)
        assert_probabilities(result.probabilities, volume.data.shape)
        middle = volume.data.shape[axis] // 2
        alone = segmenter.segment([np.take(volume.data, middle, axis=axis)], disk_prompts)[0]
    np.testing.assert_allclose(np.take(result.probabilities, middle, axis=axis), alone, atol=1e-5)


def test_rgb_with_equal_channels_matches_grayscale_at_any_height(
    segmenter: Segmenter, disk_prompts
) -> None:
    """A 1- or 3-pixel-high RGB image is (H, W, 3), not channels-first; a (3, H, W) array gives (H,
    W)."""
    rng = np.random.default_rng(4)
    for shape in ((1, 300), (3, 300), (3, 4), (20, 30)):
        gray = rng.integers(0, 256, shape).astype(np.uint8)
        expected = segmenter.segment([gray], disk_prompts)
        np.testing.assert_array_equal(
            segmenter.segment([np.repeat(gray[..., None], 3, axis=-1)], disk_prompts), expected
        )
    channels_first = np.repeat(rng.integers(0, 256, (1, 20, 30)).astype(np.uint8), 3, axis=0)
    np.testing.assert_array_equal(
        segmenter.segment([channels_first], disk_prompts),
        segmenter.segment([channels_first[0]], disk_prompts),
    )


@pytest.mark.parametrize(
    "value",
    [
        np.array([[object()]]),
        np.ones((4, 4), complex),
        np.full((4, 4), "a"),
        np.ones((0, 4)),
        np.ones(4),
    ],
)
def test_unusable_arrays_are_one_line_errors(
    segmenter: Segmenter, disk_prompts, value: np.ndarray
) -> None:
    """Object, complex, string, empty and 1D arrays: InputError naming the argument, never a
    traceback."""
    with pytest.raises(InputError, match="^query 0: ") as caught:
        segmenter.segment([value], disk_prompts)
    assert_one_line_error(caught.value)
    with pytest.raises(InputError, match="^prompt 0") as caught:
        segmenter.encode_prompts(
            [value], [np.ones(value.shape[:2] if value.ndim >= 2 else (1, 1), np.uint8)]
        )
    assert_one_line_error(caught.value)
    with pytest.raises(InputError, match="^volume: ") as caught:
        segmenter.segment_volume(value, disk_prompts)
    assert_one_line_error(caught.value)


# --------------------------------------------------------------------------------------------------
# Command line


@settings(
    max_examples=120,
    suppress_health_check=[HealthCheck.function_scoped_fixture, *COMMON["suppress_health_check"]],
    **{k: v for k, v in COMMON.items() if k != "suppress_health_check"},
)
@given(
    data=st.data(),
    extras=st.sampled_from([[], ["--save-probabilities"], ["--save-probabilities", "--overlay"]]),
)
def test_cli_segment_writes_every_output_or_one_line_and_nothing(
    data: st.DataObject,
    extras: list[str],
    prompt_files: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`promptseg segment` on generated (possibly damaged) query files: exit 0 with every output in
    the query's shape and geometry, or exit 2 with one stderr line naming the query and no file
    written."""
    CASES["cli_segment"] += 1
    with tempfile.TemporaryDirectory() as folder, time_limit():
        case = data.draw(files(Path(folder)))
        out = Path(folder) / "out"
        code = main(
            [
                "segment",
                *prompt_files,
                "--query",
                str(case.path),
                "--out",
                str(out),
                "--checkpoint",
                str(tiny_checkpoint),
                "--no-progress",
                *extras,
            ]
        )
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        written = sorted(p.name for p in out.iterdir()) if out.exists() else []
        if case.intact:
            assert code == (0 if case.valid_image and case.finite else 2), captured.err
        if (
            code == 2
        ):  # one error line, after any warnings about the same file (a header field repaired)
            assert (
                lines and lines[-1].startswith("promptseg: error: ") and str(case.path) in lines[-1]
            ), captured.err
            assert all(
                line.startswith(f"promptseg: warning: {case.path}: ") for line in lines[:-1]
            ), captured.err
            assert written == [], written
            return
        assert code == 0, captured.err
        assert all(line.startswith("promptseg: warning: ") for line in lines), captured.err
        nifti = case.path.name.endswith((".nii", ".nii.gz"))
        names = {"mask": "input_mask" + (".nii.gz" if nifti else ".png")}
        if "--save-probabilities" in extras:
            names["prob"] = "input_prob" + (".nii.gz" if nifti else ".npy")
        if "--overlay" in extras:
            names["overlay"] = "input_overlay.png"
        assert written == sorted(names.values())
        check_cli_outputs(case, out, names, nifti)


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("kind", ["int16_ct", "float64"])
def test_cli_nifti_with_any_affine_keeps_it(
    affine: str,
    kind: str,
    prompt_files: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every affine that can be read (singular, NaN, 1e30 zooms) is written back unchanged; float64
    intensities beyond float32's range (1e300) are segmented, not taken for Inf."""
    array = build_array(kind, (9, 7, 3, 1), "extreme", None, seed=0).data
    path = tmp_path / "input.nii.gz"
    save_nifti(path, array, affine_of(affine))
    case = FileCase(path, array, affine_of(affine), intact=True, valid_image=True, finite=True)
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            *prompt_files,
            "--query",
            str(path),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--no-progress",
            "--save-probabilities",
        ]
    )
    assert code == 0, capsys.readouterr().err
    check_cli_outputs(
        case, out, {"mask": "input_mask.nii.gz", "prob": "input_prob.nii.gz"}, nifti=True
    )


@pytest.mark.parametrize(
    "shape, size", [((3, 20, 30), (20, 30)), ((1, 300, 3), (1, 300)), ((3, 300, 3), (3, 300))]
)
def test_cli_channel_layouts_give_masks_of_the_image_size(
    shape: tuple[int, ...],
    size: tuple[int, int],
    prompt_files: list[str],
    tiny_checkpoint: Path,
    tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Channels-first arrays and 1- or 3-pixel-high RGB images: mask, probabilities and overlay of
    size (H, W)."""
    np.save(
        tmp_path / "input.npy", np.random.default_rng(5).integers(0, 256, shape).astype(np.uint8)
    )
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            *prompt_files,
            "--query",
            str(tmp_path / "input.npy"),
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--no-progress",
            "--save-probabilities",
            "--overlay",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out / "input_mask.png")).shape == size
    assert np.load(out / "input_prob.npy").shape == size
    legend_height, legend_width = legend_size(
        [("prediction", RED)]
    )  # the legend strip below the overlay
    assert np.asarray(Image.open(out / "input_overlay.png")).shape == (
        size[0] + legend_height,
        max(size[1], legend_width),
        3,
    )


def check_cli_outputs(case: FileCase, out: Path, names: dict[str, str], nifti: bool) -> None:
    """Masks are 0/1 (NIfTI, in the query's grid and affine) or 0/255 (PNG, the query's size)."""
    query = read_image(case.path)
    if nifti:
        mask = nib.load(out / names["mask"])
        assert mask.shape == query.array.shape
        np.testing.assert_array_equal(mask.affine, query.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    else:
        mask = np.asarray(Image.open(out / names["mask"]))
        assert mask.shape == query.array.shape[:2] and set(np.unique(mask)) <= {0, 255}
    if "prob" in names:
        probabilities = (
            np.asarray(nib.load(out / names["prob"]).dataobj)
            if nifti
            else np.load(out / names["prob"])
        )
        assert_probabilities(probabilities, mask.shape)


def test_zz_report_case_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Print how many generated cases each property ran (this module's tests run in file order)."""
    if not CASES:
        pytest.skip("no property test of this module ran in this session")
    with capsys.disabled():
        print(
            f"\nhostile-input cases run: {sum(CASES.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})"
        )
    assert all(count > 0 for count in CASES.values())
