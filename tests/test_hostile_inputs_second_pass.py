"""Hostile inputs, second pass (issue 15): the causes of the 89 failures a red team found in 401
cases.

Grouped by cause, in the issue's order: sizes claimed by headers and running out of memory, invalid
model configs, damaged weights and non-finite probabilities, invalid training configs, file-system
failures and damaged resume state in training, resuming before the first checkpoint, SIGTERM/SIGHUP
and stale temporaries, truncated PNG data, concurrent writers, and the further items after them.

The promise is the one of tests/test_hostile_inputs.py: a correct output, or one line naming the
input and the problem, with no traceback and no partial or orphaned file.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, disk_example, tiny_checkpoint, write_png  # noqa: F401 (fixture)
from PIL import Image
from safetensors.torch import load_file, save_file

from promptseg.cli import main
from promptseg.data.io import read_image
from promptseg.engine.segmenter import LabelResult
from promptseg.errors import CheckpointError, InputError
from promptseg.model.weights import CONFIG_KEY, load_model

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = REPO / "configs" / "tiny_test.yaml"


def png_bytes(width: int, height: int, raw: bytes, colour: int = 0) -> bytes:
    """A PNG whose IDAT holds `raw` (filtered scanlines) compressed, whatever the header claims."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def one_error_line(capsys: pytest.CaptureFixture[str], names: str | None = None) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("promptseg: error: "), err
    assert names is None or names in lines[0], lines[0]
    return lines[0]


def files_in(folder: Path) -> list[str]:
    """Every name in `folder`, hidden temporaries included ([] when it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def prompt_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("prompts")
    image, mask = disk_example(np.random.default_rng(1), (40, 48))
    return [
        "--prompt",
        str(write_png(root / "p.png", image)),
        str(write_png(root / "p_mask.png", mask * 255)),
    ]


@pytest.fixture(scope="module")
def query(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png(
        tmp_path_factory.mktemp("queries") / "q.png",
        disk_example(np.random.default_rng(2), (36, 44))[0],
    )


def segment_argv(
    prompt_args: list[str], queries: list[Path], out: Path, checkpoint: Path, *extra: str
) -> list[str]:
    return [
        "segment",
        *prompt_args,
        "--query",
        *map(str, queries),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--no-progress",
        *extra,
    ]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh single-threaded interpreter with the repository importable."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------------
# 1. Sizes claimed by headers; out of memory


def test_tiny_png_claiming_9000x9000_is_refused_before_decoding(
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An ~80-byte PNG whose header claims 9000x9000 pixels (and whose data stream ends cleanly):
    one line naming it, before the 81 MB it claims are decoded."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(9000, 9000, b"\0" * 9001 * 4))
    assert bomb.stat().st_size < 120
    with pytest.raises(InputError, match="the header claims 81000000 bytes"):
        read_image(bomb)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [bomb], out, tiny_checkpoint)) == 2
    one_error_line(capsys, str(bomb))
    assert files_in(out) == []


def test_npy_and_npz_headers_claiming_more_than_the_file_holds(tmp_path: Path) -> None:
    """A .npy header claiming 9000x9000 over 16 bytes of data, and an .npz member claiming far more
    than its compressed bytes can hold: refused from the header."""
    np.save(tmp_path / "small.npy", np.zeros((4, 4), np.uint8))
    raw = (
        (tmp_path / "small.npy")
        .read_bytes()
        .replace(b"'shape': (4, 4), ", b"'shape': (9000, 9000),")
    )
    (tmp_path / "lying.npy").write_bytes(raw)
    with pytest.raises(InputError, match="lying.npy: unreadable or corrupt image .truncated"):
        read_image(tmp_path / "lying.npy")
    import zipfile

    with zipfile.ZipFile(tmp_path / "lying.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.npy", raw)
    with pytest.raises(InputError, match="lying.npz: unreadable or corrupt image .truncated"):
        read_image(tmp_path / "lying.npz")


def test_pixel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PROMPTSEG_MAX_PIXELS bounds what a header may claim (PNG and NIfTI alike); a bad value is one
    line."""
    path = write_png(tmp_path / "image.png", np.zeros((40, 50), np.uint8))
    assert read_image(path).array.shape == (40, 50)
    monkeypatch.setenv("PROMPTSEG_MAX_PIXELS", "1999")
    with pytest.raises(
        InputError,
        match="image.png: too large: the header claims 2000 pixels, more than the limit of 1999",
    ):
        read_image(path)
    monkeypatch.setenv("PROMPTSEG_MAX_PIXELS", "lots")
    with pytest.raises(InputError, match="PROMPTSEG_MAX_PIXELS: must be a positive integer"):
        read_image(path)


OUT_OF_MEMORY = """
import resource, sys
import nibabel as nib
import numpy as np
from PIL import Image
from promptseg.cli import main
import promptseg.cli.segment  # commands load lazily: this one (and torch) before the limit
# 25 MB decoded, float64 copies: 200 MB each
Image.fromarray(np.full((5000, 5000), 7, np.uint8)).save(sys.argv[1])
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (used + 160 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def test_running_out_of_memory_is_one_line_naming_the_query(
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Under an address-space limit the decoded query fits in but its preparation does not: exit 2
    with one line naming the query (not a MemoryError traceback), and no output."""
    big, out = tmp_path / "big.png", tmp_path / "out"
    done = run_python(
        OUT_OF_MEMORY, str(big), *segment_argv(prompt_args, [big], out, tiny_checkpoint)
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"promptseg: error: {big}: not enough memory"), lines
    assert files_in(out) == []


# --------------------------------------------------------------------------------------------------
# 2. Model configs in checkpoints


def with_config(source: Path, target: Path, config_json: str) -> Path:
    """A copy of the weights file `source` with its model-config metadata replaced by
    `config_json`."""
    save_file(
        load_file(str(source)),
        str(target),
        metadata={CONFIG_KEY: config_json, "format": "promptseg-weights-v1"},
    )
    return target


BAD_MODEL_FIELDS = [
    {"head_dim": 0},
    {"head_dim": -16},
    {"widths": [-8, 16, 32, 32]},
    {"widths": []},
    {"widths": 8},
    {"resolution": 0},
    {"resolution": 10**9},
    {"resolution": 32.5},
    {"mlp_ratio": 1e9},
    {"mlp_ratio": "2"},
    {"attention_depth": 10**6},
    {"attention_depth": 0},
    {"attention_stages": [7]},
    {"max_prompts": 0},
    {"num_prompt_types": 2},
    {"label_propagation": "yes"},
    {"blocks_per_stage": -1},
    {"extra": []},
]


@pytest.mark.parametrize("change", BAD_MODEL_FIELDS, ids=[json.dumps(c) for c in BAD_MODEL_FIELDS])
def test_invalid_model_config_in_a_checkpoint_is_one_line(
    change: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:  # noqa: F811
    """Every field's type and range is checked before anything is built (attention_depth 10**6 would
    otherwise build a million blocks)."""
    path = with_config(
        tiny_checkpoint,
        tmp_path / "bad.safetensors",
        json.dumps({**TINY_CONFIG.to_dict(), **change}),
    )
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert (
        "\n" not in message
        and message.startswith(f"{path}: invalid model config")
        and next(iter(change)) in message
    )


def test_deeply_nested_model_config_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    nested = (
        json.dumps(TINY_CONFIG.to_dict())[:-1]
        + ', "extra": {"a": '
        + "[" * 100_000
        + "]" * 100_000
        + "}}"
    )
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_model(with_config(tiny_checkpoint, tmp_path / "deep.safetensors", nested))


HUGE_CONFIG = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY))
from promptseg.errors import CheckpointError
from promptseg.model.weights import load_model
try:
    load_model(sys.argv[1])
except CheckpointError as error:
    print(error)
"""


def test_config_implying_far_more_parameters_than_stored_is_refused_before_allocating(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:  # noqa: F811
    """A valid config of about 10**10 parameters over the tiny model's tensors: refused by comparing
    names and shapes on a storage-less model, within a 3 GiB address space (allocating it would need
    40 GB)."""
    config = {
        **TINY_CONFIG.to_dict(),
        "widths": [4096] * 4,
        "head_dim": 64,
        "attention_depth": 64,
        "resolution": 64,
    }
    path = with_config(tiny_checkpoint, tmp_path / "huge.safetensors", json.dumps(config))
    done = run_python(HUGE_CONFIG, str(path))
    assert done.returncode == 0 and "checkpoint of another configuration" in done.stdout, (
        done.stderr[-3000:]
    )


# --------------------------------------------------------------------------------------------------
# 3. Damaged weight values; non-finite probabilities


def damaged(tensor: torch.Tensor, damage: str) -> torch.Tensor:
    if damage == "int8":
        return tensor.to(torch.int8)
    if damage == "bool":
        return tensor > 0
    return torch.full_like(tensor, {"nan": float("nan"), "inf": float("inf"), "1e30": 1e30}[damage])


@pytest.mark.parametrize("damage", ["nan", "inf", "1e30", "int8", "bool"])
def test_damaged_weight_values_are_refused_at_load(
    damage: str,
    tiny_checkpoint: Path,
    tmp_path: Path,  # noqa: F811
    prompt_args: list[str],
    query: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Weights full of NaN, Inf or 1e30, or of an integer or bool type: one line naming the file and
    the tensor, and no output (they used to give a 100% NaN probability file with exit 0)."""
    tensors = {name: damaged(t, damage) for name, t in load_file(str(tiny_checkpoint)).items()}
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={CONFIG_KEY: TINY_CONFIG.to_json()})
    with pytest.raises(CheckpointError, match="damaged.safetensors: weight "):
        load_model(path)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [query], out, path, "--save-probabilities")) == 2
    one_error_line(capsys, str(path))
    assert files_in(out) == []


def test_non_finite_probabilities_are_never_written(
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import promptseg.cli.segment as segment_command

    def nan_prediction(data, segmenter, prompts, axis, threshold):
        return LabelResult((1,), np.full((1, *data.array.shape[:2]), np.nan, np.float32), threshold)

    monkeypatch.setattr(segment_command, "predict", nan_prediction)
    out = tmp_path / "out"
    assert (
        main(segment_argv(prompt_args, [query], out, tiny_checkpoint, "--save-probabilities")) == 2
    )
    assert "non-finite probabilities" in one_error_line(capsys, str(query))
    assert files_in(out) == []


# --------------------------------------------------------------------------------------------------
# 4. Training configs


BAD_TRAINING_VALUES = [
    {"checkpoint_every": 0},
    {"shots": [0, 4]},
    {"shots": [4, 1]},
    {"shots": [1, 65]},
    {"shots": "lots"},
    {"episodes_per_step": 0},
    {"queries": 0},
    {"lr": float("nan")},
    {"lr": -1},
    {"steps": "lots"},
    {"steps": -5},
    {"attention_kernel": "fastest"},
    {"val_every": 0},
    {"val_shots": 0},
    {"axis": 3},
    {"synthetic_fraction": 2},
    {"grad_clip": float("inf")},
    {"loader_workers": -1},
    {"seed": -1},
    {"mixed_precision": "yes"},
    {"model": {"head_dim": 0}},
    {"model": [1, 2]},
]


@pytest.mark.parametrize("change", BAD_TRAINING_VALUES, ids=[str(c) for c in BAD_TRAINING_VALUES])
def test_invalid_training_config_is_one_line_and_trains_nothing(
    change: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad value: exit 2 with one line naming the file and the key, and no run folder (steps:
    -5 used to write an untrained model with exit 0)."""
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY_TRAIN.read_text()), **change}))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 2
    )
    line = one_error_line(capsys, str(config))
    assert f"{next(iter(change))}:" in line
    assert not out.exists()


def test_training_config_built_in_code_is_checked_by_the_trainer(tmp_path: Path) -> None:
    import dataclasses

    from promptseg.train.config import TrainConfig
    from promptseg.train.trainer import Trainer

    with pytest.raises(InputError, match="training config: steps: must be an integer in 1.."):
        Trainer(
            dataclasses.replace(TrainConfig.load(TINY_TRAIN), steps=-5),
            [],
            tmp_path,
            progress=False,
        )
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# 5-7. Training: file-system failures, damaged resume state, resuming before a checkpoint, stale
# temporaries


def train_argv(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY_TRAIN),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step tiny run checkpointed at both steps (step-2 is the newest)."""
    import yaml

    root = tmp_path_factory.mktemp("run")
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {**yaml.safe_load(TINY_TRAIN.read_text()), "steps": 2, "checkpoint_every": 1}
        )
    )
    out = root / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def copy_run(run: Path, target: Path) -> Path:
    target.mkdir()
    for path in run.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_train_out_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert main(train_argv(out)) == 2
    one_error_line(capsys, str(out))
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize(
    "errno_, text", [(28, "No space left on device"), (30, "Read-only file system")]
)
def test_disk_full_or_read_only_at_a_checkpoint_is_one_line(
    errno_: int,
    text: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from promptseg.train import checkpoint

    def failing_save_file(tensors, filename, metadata=None):
        raise OSError(errno_, text, filename)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    out = tmp_path / "run"
    assert main(train_argv(out, "--steps", "1")) == 2
    line = one_error_line(capsys)
    assert (
        "training stopped, cannot write the run folder" in line
        and text in line
        and str(out) in line
    )
    assert not [name for name in files_in(out) if name.startswith(".")]


def damage_meta(run: Path, change) -> None:
    meta = run / "step-2.json"
    data = json.loads(meta.read_text())
    change(data)
    meta.write_text(json.dumps(data))


def set_betas(data: dict) -> None:
    data["param_groups"][0]["betas"] = [2.0, 0.999]


def wrong_shaped_optimizer_tensor(run: Path) -> None:
    tensors = load_file(str(run / "step-2.safetensors"))
    name = next(n for n in tensors if n.endswith(".exp_avg") and tensors[n].dim() >= 2)
    tensors[name] = tensors[name].flatten()[:-1].clone()
    save_file(
        tensors, str(run / "step-2.safetensors"), metadata={CONFIG_KEY: TINY_CONFIG.to_json()}
    )


RESUME_DAMAGE = {
    "step -5": lambda run: damage_meta(run, lambda data: data.update(step=-5)),
    "step 2.5": lambda run: damage_meta(run, lambda data: data.update(step=2.5)),
    "betas out of range": lambda run: damage_meta(run, set_betas),
    "negative learning rate": lambda run: damage_meta(
        run, lambda data: data["param_groups"][1].update(lr=-1.0)
    ),
    "wrong-shaped optimizer tensor": wrong_shaped_optimizer_tensor,
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_damaged_resume_state_is_one_line(
    damage: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    RESUME_DAMAGE[damage](run)
    assert main(train_argv(run, "--resume", "--steps", "3")) == 2
    one_error_line(capsys, "step-2.")


def test_resume_before_the_first_checkpoint_logs_each_step_once(tmp_path: Path) -> None:
    """A run stopped at step 3 before any checkpoint (checkpoint_every 10), then --resume: it starts
    again at step 0, and log.jsonl holds each step once (the stopped run's 3 steps used to stay)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(
        "".join(json.dumps({"step": n, "loss": 1.0}) + "\n" for n in (1, 2, 3))
    )
    assert main(train_argv(out, "--resume", "--steps", "4")) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_checkpoint_temporaries_are_swept_on_resume(
    finished_run: Path, tmp_path: Path
) -> None:
    """A checkpoint temporary that a SIGKILLed run left behind is removed by the next run; a
    temporary of a live process and a user's hidden file are kept."""
    run = copy_run(finished_run, tmp_path / "run")
    stale = run / f".step-3.promptseg-{dead_pid()}-abcd1234.safetensors"
    live = run / f".step-3.promptseg-{os.getppid()}-abcd1234.safetensors"
    mine = run / ".notes.safetensors"
    for path in (stale, live, mine):
        path.write_bytes(b"x" * 100)
    assert main(train_argv(run, "--resume", "--steps", "3")) == 0
    assert not stale.exists() and live.exists() and mine.exists()


SIGNAL_WHILE_WRITING = """
import os, signal, sys
import nibabel as nib
import numpy as np
import promptseg.data.io as io
save = np.save
def save_then_signal(file, array, *args, **kwargs):
    save(file, array, *args, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
np.save = save_then_signal
from promptseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_while_writing_leaves_no_file(
    signame: str,
    code: int,
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:  # noqa: F811
    """The signal arrives once the probability file's temporary is written: exit 128 + N after the
    same clean-up as Ctrl-C, with neither the mask, the probabilities nor a temporary left (they
    used to stay, and a rerun refused "output exists")."""
    out = tmp_path / "out"
    argv = segment_argv(prompt_args, [query], out, tiny_checkpoint, "--save-probabilities")
    done = run_python(SIGNAL_WHILE_WRITING, signame, *argv)
    assert done.returncode == code, done.stderr[-3000:]
    assert done.stderr.strip() == f"promptseg: stopped by {signame}"
    assert files_in(out) == []


def test_stale_output_temporaries_are_swept_by_the_next_segment_run(
    prompt_args: list[str], query: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".q_prob.promptseg-{dead_pid()}-x1y2z3w4.npy"
    stale.write_bytes(b"\x93NUMPY" + b"\0" * 1000)
    assert main(segment_argv(prompt_args, [query], out, tiny_checkpoint)) == 0
    assert files_in(out) == ["q_mask.png"]


# --------------------------------------------------------------------------------------------------
# 8. Truncated image data


def test_png_whose_pixel_data_ends_cleanly_half_way_is_refused(
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 64x64 PNG whose compressed stream ends (cleanly) after 32 rows: Pillow fills the rest with
    zeros and the image used to be segmented as complete."""
    half = tmp_path / "half.png"
    half.write_bytes(png_bytes(64, 64, b"".join(b"\0" + bytes([200] * 64) for _ in range(32))))
    with pytest.raises(
        InputError,
        match="half.png: unreadable or corrupt image .truncated: the pixel data holds 2080 of the "
        "4160",
    ):
        read_image(half)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [half], out, tiny_checkpoint)) == 2
    one_error_line(capsys, str(half))
    assert files_in(out) == []


@pytest.mark.parametrize(
    "mode, options",
    [
        ("L", {}),
        ("RGB", {"interlace": 1}),
        ("P", {"interlace": 1}),
        ("1", {}),
        ("I;16", {}),
        ("RGBA", {}),
    ],
)
def test_complete_pngs_of_every_layout_pass_the_truncation_check(
    mode: str, options: dict, tmp_path: Path
) -> None:
    """The row count of the check follows bit depth, channels and Adam7 interlacing."""
    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).convert(mode).save(path, **options)
    assert read_image(path).array.shape[:2] == (37, 53)


# --------------------------------------------------------------------------------------------------
# 16. Writers of one folder at the same time


def test_a_querys_files_are_moved_into_place_together_under_a_folder_lock(tmp_path: Path) -> None:
    """While another process holds the output folder's lock, a group of files is written to
    temporaries but none is moved into place; once the lock is free all of them are (so two
    --overwrite runs can no longer mix one query's files)."""
    from promptseg.data.io import png_writer
    from promptseg.files import atomic_write_group

    folder = tmp_path / "out"
    folder.mkdir()
    outputs = [
        (folder / "q_mask.png", png_writer(np.zeros((4, 4), np.uint8))),
        (folder / "q_overlay.png", png_writer(np.zeros((4, 4, 3), np.uint8))),
    ]
    holder = os.open(folder, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    writer = threading.Thread(target=atomic_write_group, args=(outputs, True))
    try:
        writer.start()
        time.sleep(0.5)
        assert [name for name in files_in(folder) if not name.startswith(".")] == []
    finally:
        os.close(holder)
        writer.join(timeout=30)
    assert files_in(folder) == ["q_mask.png", "q_overlay.png"]


# --------------------------------------------------------------------------------------------------
# 12. More unchecked values


@pytest.mark.parametrize("shots", ["0", "65"])
def test_bench_shots_outside_the_prompt_limit_is_one_line(
    shots: str,
    tiny_checkpoint: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "bench",
        "--slices",
        "2",
        "--repeats",
        "1",
        "--shots",
        shots,
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    assert "--shots: must lie in 1..64" in one_error_line(capsys)


def test_eval_queries_zero_and_out_folder_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any model or dataset is loaded (--data names a folder that does not exist)."""
    base = ["eval", "--data", str(tmp_path / "none"), "--episodes", "1", "--no-progress"]
    assert main([*base, "--queries", "0"]) == 2
    assert "--queries: must be positive" in one_error_line(capsys)
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys, str(tmp_path))


@pytest.mark.parametrize(
    "text",
    [
        '{"labels": {"background": 0, "liver": 1' + "0" * 5000 + "}}",
        '{"labels": {"1' + "0" * 5000 + '": "liver"}}',
        '{"labels": {"liver": 99999999999}}',
        '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_dataset_json_with_huge_integers_or_deep_nesting_is_one_line(
    text: str, tmp_path: Path
) -> None:
    from promptseg.data.layouts import open_dataset

    root = tmp_path / "Dataset001"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    write_png(root / "imagesTr" / "case_0000.png", np.zeros((8, 8), np.uint8))
    write_png(root / "labelsTr" / "case.png", np.ones((8, 8), np.uint8))
    (root / "dataset.json").write_text(text)
    with pytest.raises(InputError) as error:
        open_dataset(root)
    assert "\n" not in str(error.value) and "dataset.json" in str(error.value)


# --------------------------------------------------------------------------------------------------
# 13. Python API gaps


def test_soft_float_mask_array_is_refused_not_taken_as_all_foreground(
    tiny_checkpoint: Path,
) -> None:  # noqa: F811
    """A soft mask (0.3 outside the disk) used to make the whole image the prompt; 0/1 floats still
    work."""
    from promptseg.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    image, mask = disk_example(np.random.default_rng(4), (40, 48))
    soft = np.where(mask > 0, 0.9, 0.3).astype(np.float32)
    with pytest.raises(InputError, match="prompt 0 mask: label map must hold integers .found 0.3"):
        segmenter.encode_prompts([image], [soft])
    assert segmenter.encode_prompts([image], [mask.astype(np.float32)]).num_prompts == 1


def test_bytes_paths_are_read_like_str_paths(query: Path) -> None:
    from promptseg.data.io import read_label

    assert read_image(os.fsencode(query)).array.shape == (36, 44)
    assert read_label(os.fsencode(query)).path == str(query)


# --------------------------------------------------------------------------------------------------
# 14. Lossy masks


def test_jpeg_mask_is_thresholded_at_half_its_range_with_a_warning(tmp_path: Path) -> None:
    """Compression ringing around a 0/255 disk used to add foreground wherever it was above zero."""
    from promptseg.data.io import read_label

    _, mask = disk_example(np.random.default_rng(5), (96, 96))
    path = tmp_path / "mask.jpg"
    Image.fromarray(mask * 255).save(path, quality=60)
    assert (
        np.asarray(Image.open(path)) > 0
    ).sum() > mask.sum() * 1.02  # the ringing the reader must not keep
    with pytest.warns(UserWarning, match="mask.jpg: JPEG is lossy"):
        label = read_label(path).array
    assert set(np.unique(label)) == {0, 255}
    assert abs(int((label > 0).sum()) - int(mask.sum())) < 0.02 * mask.sum()


# --------------------------------------------------------------------------------------------------
# 17. Existing report files


def test_bench_out_keeps_an_existing_file_unless_overwrite(
    tiny_checkpoint: Path,
    tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "bench.json"
    out.write_text("earlier figures")
    argv = [
        "bench",
        "--slices",
        "2",
        "--repeats",
        "1",
        "--shots",
        "1",
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    assert "output exists; pass --overwrite" in one_error_line(capsys, str(out))
    assert out.read_text() == "earlier figures"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["results"][0]["slices"] == 2


@pytest.mark.parametrize("option", ["--out", "--markdown", "--plot"])
def test_eval_reports_keep_existing_files_unless_overwrite(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "report"
    existing.write_text("earlier report")
    assert (
        main(
            [
                "eval",
                "--data",
                str(tmp_path / "none"),
                "--episodes",
                "1",
                "--no-progress",
                option,
                str(existing),
            ]
        )
        == 2
    )
    assert "output exists; pass --overwrite" in one_error_line(capsys, str(existing))
    assert existing.read_text() == "earlier report"


# --------------------------------------------------------------------------------------------------
# 11. Stray stderr lines


def test_nibabel_header_repairs_are_one_warning_each_not_stray_lines(
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A NIfTI whose qform_code is invalid: nibabel repairs it and logs to stderr, once per read
    (twice per query); now one `promptseg: warning:` line naming the file, and the query is
    segmented."""
    import nibabel as nib

    path = tmp_path / "scan.nii"
    nib.save(
        nib.Nifti1Image(
            np.random.default_rng(6).normal(size=(20, 24, 3)).astype(np.float32), np.eye(4)
        ),
        path,
    )
    raw = bytearray(path.read_bytes())
    raw[252:254] = struct.pack("<h", 7)  # qform_code 7: not a valid code
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    done = run_python(
        "import sys; from promptseg.cli import main; sys.exit(main(sys.argv[1:]))",
        *segment_argv(prompt_args, [path], out, tiny_checkpoint),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        (
            f"promptseg: warning: {path}: damaged header field repaired on reading "
            "(qform_code 7 not valid; setting to 0)"
        )
    ]
    assert files_in(out) == ["scan_mask.nii.gz"]


def test_click_at_1e308_gives_no_overflow_warning(tiny_checkpoint: Path) -> None:  # noqa: F811
    import warnings

    from promptseg.engine.prompts_input import Prompt
    from promptseg.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    image = disk_example(np.random.default_rng(7), (40, 48))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="the click lies outside the image"):
            segmenter.encode_prompts(
                [Prompt(image=image, kind="click", points=[(1e308, 5.0)], name="image")]
            )


# --------------------------------------------------------------------------------------------------
# 10. Memory of --overlay


def test_volume_overlay_is_built_from_the_slices_it_shows(tmp_path: Path) -> None:
    """Mask and overlay of a (64, 64, 256) volume: NumPy memory of a few bytes per voxel for the
    mask itself, where the whole-volume label map behind the overlay used to add about 23 (int64
    argmax, values, maxima)."""
    import argparse
    import tracemalloc

    from promptseg.cli.segment import QueryJob, render_outputs
    from promptseg.data.io import ImageData

    rng = np.random.default_rng(8)
    shape = (64, 64, 256)
    volume = ImageData(
        rng.integers(-1000, 1000, shape).astype(np.int16), True, np.eye(4), None, "scan.nii.gz"
    )
    result = LabelResult((1,), rng.random((1, *shape), dtype=np.float32), 0.5)
    job = QueryJob(
        "scan.nii.gz",
        True,
        {"mask": str(tmp_path / "m.nii.gz"), "overlay": str(tmp_path / "o.png")},
    )
    args = argparse.Namespace(threshold=0.5, axis=2, overwrite=False)
    tracemalloc.start()
    try:
        writers = render_outputs(job, volume, result, args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(writers) == {"mask", "overlay"}
    assert peak / np.prod(shape) < 6, f"{peak / np.prod(shape):.1f} bytes per voxel"


# --------------------------------------------------------------------------------------------------
# 9. Orientation through affines


def test_the_same_scan_stored_lps_or_ras_gives_the_same_result_in_each_grid(
    tiny_checkpoint: Path,
) -> None:  # noqa: F811
    """One scan stored RAS and stored LPS (first two axes reversed, affine to match: the same world
    geometry) is segmented identically, each result in its own voxel grid; a prompt slice stored LPS
    is turned like the queries."""
    from promptseg.data.io import ImageData, canonical_view
    from promptseg.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    rng = np.random.default_rng(9)
    ras = rng.normal(size=(24, 20, 5)).astype(np.float32)
    ras[4:14, 2:9] += 3  # an off-centre block: left-right and front-back flips change the picture
    ras_affine = np.diag([1.5, 1.2, 3.0, 1.0])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [ras.shape[0] - 1, ras.shape[1] - 1]
    lps, lps_affine = ras[::-1, ::-1].copy(), ras_affine @ flip
    np.testing.assert_allclose(
        lps_affine @ [0, 0, 0, 1], ras_affine @ [ras.shape[0] - 1, ras.shape[1] - 1, 0, 1]
    )
    assert np.array_equal(canonical_view(lps, lps_affine), ras)
    image, mask = disk_example(rng, (24, 20))
    prompts = segmenter.encode_prompts([image], [mask])
    from_ras = segmenter.segment_volume(
        ImageData(ras, True, ras_affine, None, "ras.nii.gz"), prompts
    ).probabilities
    from_lps = segmenter.segment_volume(
        ImageData(lps, True, lps_affine, None, "lps.nii.gz"), prompts
    ).probabilities
    assert from_lps.shape == lps.shape
    np.testing.assert_array_equal(from_lps[::-1, ::-1], from_ras)


def test_a_prompt_slice_stored_lps_encodes_like_the_same_slice_stored_ras(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:  # noqa: F811
    import nibabel as nib

    from promptseg.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    image, mask = disk_example(np.random.default_rng(10), (24, 20))
    image[2:8, 3:7] = 255  # off-centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [23, 19]
    paths = {}
    for name, affine, turn in (
        ("ras", np.eye(4), lambda a: a),
        ("lps", flip, lambda a: a[::-1, ::-1]),
    ):
        paths[name] = []
        for kind, array in (("image", image), ("mask", mask)):
            path = tmp_path / f"{name}_{kind}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(turn(array))[..., None], affine), path)
            paths[name].append(str(path))
    ras, lps = (segmenter.encode_prompts([paths[n][0]], [paths[n][1]]) for n in ("ras", "lps"))
    assert ras.key == lps.key


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99", "potato"])
def test_unusable_devices_are_one_line(device: str, tiny_checkpoint: Path) -> None:  # noqa: F811
    from promptseg.engine.segmenter import Segmenter

    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(InputError, match="^device: "):
        Segmenter.from_checkpoint(tiny_checkpoint, device=device)


def test_cuda_without_a_gpu_is_one_line(tiny_checkpoint: Path) -> None:  # noqa: F811
    from promptseg.engine.segmenter import Segmenter

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(InputError, match="device: cuda requested but no CUDA GPU is available"):
        Segmenter.from_checkpoint(tiny_checkpoint, device="cuda")


@pytest.mark.parametrize("threshold", [float("nan"), 0.0, 1.0, -1.0, "0.5"])
def test_threshold_outside_0_1_or_nan_is_refused(threshold: object, tiny_checkpoint: Path) -> None:  # noqa: F811
    from promptseg.engine.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    image, mask = disk_example(np.random.default_rng(11), (24, 20))
    prompts = {1: segmenter.encode_prompts([image], [mask])}
    with pytest.raises(InputError, match="threshold: must lie strictly between 0 and 1"):
        segmenter.segment_labels([image], prompts, threshold=threshold)


def test_prompts_encoded_by_another_model_are_one_line(tiny_checkpoint: Path) -> None:  # noqa: F811
    """Prompts of a model with other widths used to end in a shape-mismatch traceback."""
    from promptseg.engine.segmenter import Segmenter
    from promptseg.model import ModelConfig, PromptSegNet

    ours = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    other = Segmenter(
        PromptSegNet(ModelConfig(**{**TINY_CONFIG.to_dict(), "widths": (8, 16, 48, 48)})),
        device="cpu",
    )
    image, mask = disk_example(np.random.default_rng(12), (24, 20))
    with pytest.raises(InputError, match="prompts: were encoded by another Segmenter"):
        ours.segment([image], other.encode_prompts([image], [mask]))
    assert ours.segment([image], ours.encode_prompts([image], [mask])).shape == (1, 24, 20)


EXPORT_A_LINEAR = """
import torch
from promptseg.export.onnx_export import trace
dynamic = {"input": {0: torch.export.Dim("batch")}}
trace(torch.nn.Linear(3, 2), (torch.zeros(2, 3),), ["x"], ["y"], dynamic, 18)
"""


def test_onnx_export_prints_no_torchvision_lines() -> None:
    """The exporter's registry used to print "torchvision is not installed. Skipping ..." to stderr
    once per torchvision operator (eight lines per export) on machines without torchvision."""
    done = run_python(EXPORT_A_LINEAR)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchvision" not in done.stderr


# --------------------------------------------------------------------------------------------------
# Third round (issue 15's remaining gaps): torch's allocator failing, queries read once, two real
# concurrent --overwrite runs, and the causes the fuzzing harness (benchmarks/hostile) found.


def allocate_too_much(*args: object, **kwargs: object) -> None:
    """A real failure of torch's CPU allocator (a RuntimeError, not a MemoryError)."""
    torch.empty(2**50, dtype=torch.uint8)


def test_torch_cpu_allocator_failure_segmenting_is_one_line_naming_the_query(
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """DefaultCPUAllocator's "can't allocate memory" RuntimeError used to escape as a traceback."""
    from promptseg.engine.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "segment_labels", allocate_too_much)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [query], out, tiny_checkpoint)) == 2
    line = one_error_line(capsys, str(query))
    assert "not enough memory to segment it" in line
    assert files_in(out) == []


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)",
        "[enforce fail at CPUAllocator.cpp:50] ((ptr) != nullptr). DefaultCPUAllocator: not enough "
        "memory: you tried to allocate 4294967296 bytes.",
    ],
)
def test_torch_allocator_failure_encoding_prompts_is_the_out_of_memory_line(
    message: str,
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Outside a query (here encoding the prompts) it is the command's out-of-memory line, as for
    MemoryError."""
    from promptseg.engine.segmenter import Segmenter

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(message)

    monkeypatch.setattr(Segmenter, "encode_prompts", fail)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [query], out, tiny_checkpoint)) == 2
    assert one_error_line(capsys) == (
        "promptseg: error: segment: out of memory; use smaller or fewer inputs"
    )
    assert files_in(out) == []


def test_other_runtime_errors_are_not_taken_for_out_of_memory(
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guard: a RuntimeError that is not an allocation failure is a bug, and stays visible."""
    from promptseg.engine.segmenter import Segmenter

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.setattr(Segmenter, "segment_labels", fail)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(segment_argv(prompt_args, [query], tmp_path / "out", tiny_checkpoint))


@pytest.mark.parametrize("kept_bytes", [0, 3000, 256 * 2**20])
def test_segment_reads_each_query_once_whatever_it_may_keep(
    kept_bytes: int,
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Queries beyond KEPT_QUERY_BYTES used to be read twice (validation, then segmentation), and a
    NIfTI header repair was logged on each read. Now each is read once (its header checked up
    front), whatever the budget, and nibabel's repair is one warning."""
    import promptseg.cli.segment as segment_command

    queries = []
    for n in range(3):
        image = disk_example(np.random.default_rng(n), (40, 40))[0]
        queries.append(str(write_png(tmp_path / f"q{n}.png", image)))
    image = nib.Nifti1Image(np.random.default_rng(5).random((12, 10, 4)).astype(np.float32), None)
    image.header["qform_code"] = 7  # nibabel repairs it on every read ("qform_code 7 not valid")
    volume = tmp_path / "v.nii"
    nib.save(image, volume)
    raw = bytearray(volume.read_bytes())
    raw[252:254] = struct.pack("<h", 7)
    volume.write_bytes(bytes(raw))
    queries.append(str(volume))
    reads: list[str] = []
    read_input = segment_command.read_input

    def counting_read(path: str, series: str | None = None) -> object:
        reads.append(str(path))
        return read_input(path, series)

    monkeypatch.setattr(segment_command, "read_input", counting_read)
    monkeypatch.setattr(segment_command, "KEPT_QUERY_BYTES", kept_bytes)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [Path(q) for q in queries], out, tiny_checkpoint)) == 0
    assert sorted(reads) == sorted(queries)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "damaged header field" in line] == [
        f"promptseg: warning: {volume}: damaged header field repaired on reading "
        "(qform_code 7 not valid; setting to 0)"
    ], err
    assert len(files_in(out)) == 4


def test_a_query_read_when_segmented_is_still_validated(
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A query beyond the kept bytes is checked by its header before anything is written, and its
    data when it is segmented: a volume of NaNs is one line naming it, after the earlier query's
    complete outputs, and nothing of its own."""
    import promptseg.cli.segment as segment_command

    monkeypatch.setattr(segment_command, "KEPT_QUERY_BYTES", 0)
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), np.nan, np.float32), np.eye(4)), bad)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_bytes(90000, 90000, b"\x00" * 10))
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [query, huge], out, tiny_checkpoint)) == 2
    one_error_line(capsys, f"{huge}: too large")
    assert files_in(out) == []  # the header problem is found before anything is written
    assert main(segment_argv(prompt_args, [query, bad], out, tiny_checkpoint)) == 2
    one_error_line(capsys, f"{bad}: volume contains non-finite intensities")
    assert files_in(out) == ["q_mask.png"]


def test_two_concurrent_overwrite_runs_never_mix_one_querys_files(
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two real `promptseg segment --overwrite` processes, started together on the same queries
    into one folder, from prompts giving different results: each query's mask and probabilities
    come from one run (the run whose own result, computed alone in-process, each is closest to).
    On the code before the folder lock (709bf18), 2 of 4 trials mixed a query's files."""
    image, mask = disk_example(np.random.default_rng(21), (40, 40))
    prompt_image = write_png(tmp_path / "p.png", image)
    prompts = {
        "inside": write_png(tmp_path / "inside.png", mask * 255),
        "outside": write_png(tmp_path / "outside.png", (1 - mask) * 255),
    }
    queries = [  # large enough that writing a query's files takes a while (a wide race window)
        str(
            write_png(tmp_path / f"q{n}.png", disk_example(np.random.default_rng(n), (256, 256))[0])
        )
        for n in range(16)
    ]

    def argv(run: str, out: Path) -> list[str]:
        return ["segment", "--prompt", str(prompt_image), str(prompts[run]), "--query"] + [
            *queries,
            "--out",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--no-progress",
            "--save-probabilities",
            "--overlay",
            "--overwrite",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    shared = tmp_path / "shared"
    together = [
        subprocess.Popen(
            [sys.executable, "-m", "promptseg", *argv(run, shared)],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for run in prompts
    ]
    for run in prompts:  # each run's own result, alone, while the two processes start
        assert main(argv(run, tmp_path / run)) == 0
    for process in together:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    assert not [name for name in files_in(shared) if name.startswith(".")]

    def closest(kind: str, stem: str, written: np.ndarray) -> set[str]:
        """The runs whose own `kind` output of query `stem` is nearest to `written`."""
        ext = "npy" if kind == "prob" else "png"  # mask, overlay
        own = {}
        for run in prompts:
            path = tmp_path / run / f"{stem}_{kind}.{ext}"
            own[run] = np.load(path) if kind == "prob" else np.asarray(Image.open(path))
        gaps = {run: np.abs(own[run].astype(np.float64) - written).sum() for run in prompts}
        return {run for run, gap in gaps.items() if gap == min(gaps.values())}

    for query in queries:
        stem = Path(query).stem
        written_prob = np.load(shared / f"{stem}_prob.npy")
        by_prob = closest("prob", stem, written_prob)
        assert len(by_prob) == 1  # the two runs' probabilities differ, so a mix would show
        for kind in ("mask", "overlay"):
            written = np.asarray(Image.open(shared / f"{stem}_{kind}.png"))
            assert by_prob <= closest(kind, stem, written), f"{stem}: {kind} of the other run"


def write_volume_dataset(root: Path, flip: bool) -> Path:
    """A 3D dataset of one case, (X, Y, Z) = (14, 12, 10), stored RAS, or the same scan stored LPS
    (x and y flipped in the grid and in the affine: identical world geometry)."""
    rng = np.random.default_rng(31)
    image = rng.integers(0, 200, (14, 12, 10)).astype(np.int16)
    labels = np.zeros((14, 12, 10), np.uint8)
    labels[2:7, 3:11, 2:6] = 1  # off-centre, so that a flip shows
    affine = np.diag([0.9, 0.8, 2.0, 1.0])
    if flip:
        image, labels = image[::-1, ::-1].copy(), labels[::-1, ::-1].copy()
        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        lps[:2, 3] = [0.9 * 13, 0.8 * 11]  # voxel (13, 11, 0) is where (0, 0, 0) was
        affine = affine @ lps
    for folder, array in (("images", image), ("labels", labels)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), root / folder / "case1.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"name": root.name, "dims": 3, "labels": {"background": 0, "target": 1}})
    )
    return root


def test_training_slices_of_a_volume_stored_lps_or_ras_are_the_same(tmp_path: Path) -> None:
    """Training and eval data (data.index) used to cut volumes in stored order, so the same scan
    stored LPS gave other (flipped) examples than stored RAS, and than the engine, which cuts
    queries in their closest RAS orientation. Now all three agree."""
    from promptseg.data.index import load_examples
    from promptseg.data.io import canonical_view, read_image, slice_volume
    from promptseg.data.layouts import open_dataset

    examples = {
        flip: load_examples(open_dataset(write_volume_dataset(tmp_path / f"d{flip}", flip)), 16)
        for flip in (False, True)
    }
    ras, lps = examples[False], examples[True]
    assert ras[0].shape == lps[0].shape and len(ras[0]) == 4
    np.testing.assert_array_equal(ras[0], lps[0])
    np.testing.assert_array_equal(ras[1], lps[1])
    query = read_image(tmp_path / "dTrue" / "labels" / "case1.nii.gz")  # as the engine cuts it
    engine_slices = slice_volume(canonical_view(query.array, query.affine), 2)
    filled = engine_slices.reshape(len(engine_slices), -1).any(axis=1)
    assert filled.sum() == len(lps[1])
    assert engine_slices[filled][:, 2:7].any() and not engine_slices[filled][:, 7:].any()


def test_packs_of_reoriented_volumes_are_marked_and_stale_without_the_mark(
    tmp_path: Path,
) -> None:
    """A dataset whose volumes are cut in another order than stored gets "slices" in packed.json,
    so that a pack written before (stored-order slices) is rebuilt; a dataset stored RAS keeps the
    meta it had, so its existing packs stay valid."""
    from promptseg.data.index import build_tasks
    from promptseg.data.layouts import open_dataset
    from promptseg.data.packed import (
        ORIENTED_SLICES,
        _expected_meta,
        pack_folder,
        reoriented_when_sliced,
    )

    lps = open_dataset(write_volume_dataset(tmp_path / "lps", flip=True))
    ras = open_dataset(write_volume_dataset(tmp_path / "ras", flip=False))
    assert reoriented_when_sliced(lps) and not reoriented_when_sliced(ras)
    assert _expected_meta(lps, 16, 2, 3)["slices"] == ORIENTED_SLICES
    assert "slices" not in _expected_meta(ras, 16, 2, 3)
    cache = tmp_path / "cache"
    build_tasks([tmp_path / "lps"], 16, cache_dir=cache, min_examples=1)
    folder = pack_folder(cache, lps, 16, 2, 3)
    meta = json.loads((folder / "packed.json").read_text())
    assert meta["slices"] == ORIENTED_SLICES
    del meta["slices"]  # a pack of the stored-order era
    (folder / "packed.json").write_text(json.dumps(meta))
    stale = folder / "labels.npy"
    before = stale.stat().st_mtime_ns
    build_tasks([tmp_path / "lps"], 16, cache_dir=cache, min_examples=1)
    assert json.loads((folder / "packed.json").read_text())["slices"] == ORIENTED_SLICES
    assert (folder / "labels.npy").stat().st_mtime_ns != before


def test_a_slice_of_the_fuzzing_harness_keeps_the_promise(
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """30 of the harness's fuzzed files (benchmarks/hostile, evenly spread over its categories) as
    queries and prompt images, through the CLI in-process and the API: each run is complete valid
    outputs or one error line and nothing left (the full harness: python -m
    benchmarks.hostile.run)."""
    from benchmarks.hostile.fuzz import fuzz_cases
    from benchmarks.hostile.run import Harness

    cases = fuzz_cases()
    chosen = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, 30)]
    image, mask = disk_example(np.random.default_rng(41), (48, 40))
    prompt = (write_png(tmp_path / "p.png", image), write_png(tmp_path / "p_mask.png", mask))
    query = write_png(tmp_path / "q.png", disk_example(np.random.default_rng(42), (44, 36))[0])
    work = tmp_path / "work"
    work.mkdir()
    harness = Harness(prompt, query, work, tiny_checkpoint)
    routes = ("cli-query", "cli-prompt-image", "api-query")
    outcomes = [o for case in chosen for o in harness.run_case(case, routes)]
    failed = [f"{o.case.filename} {o.route}: {o.cause}" for o in outcomes if not o.passed]
    assert failed == []
    assert len(outcomes) == 90 and any(o.refused for o in outcomes)
    assert any(o.passed and not o.refused for o in outcomes)


def stored_gzip(data: bytes) -> bytes:
    """`data` gzipped without compression (stored deflate blocks: a changed byte stays a valid
    stream, only the CRC tells)."""
    return gzip.compress(data, compresslevel=0, mtime=0)


@pytest.mark.parametrize("damage", ["cut-trailer", "cut-last-byte", "voxel-changed", "crc"])
def test_nifti_gz_cut_after_its_voxels_or_changed_in_place_is_refused(
    damage: str,
    prompt_args: list[str],
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """nibabel reads only the bytes the voxels need, so a .nii.gz cut after them (its gzip trailer
    gone) or with voxel bytes changed in place (a stored block: still a valid stream) was segmented
    with exit 0, the CRC never checked. Now the gzip stream must reach its end and checksum."""
    volume = np.random.default_rng(51).integers(0, 200, (12, 10, 4)).astype(np.int16)
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    packed = bytearray(stored_gzip(raw))
    if damage == "cut-trailer":
        packed = packed[:-8]
    elif damage == "cut-last-byte":
        packed = packed[:-1]
    elif damage == "voxel-changed":
        packed[len(packed) // 2] ^= 0x55
    else:
        packed[-8] ^= 0x01
    path = tmp_path / f"{damage}.nii.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(InputError, match="unreadable or corrupt image"):
        read_image(path)
    out = tmp_path / "out"
    assert main(segment_argv(prompt_args, [path], out, tiny_checkpoint)) == 2
    one_error_line(capsys, f"{path}: unreadable or corrupt image")
    assert files_in(out) == []


def test_complete_nifti_gz_of_several_members_or_padded_still_reads(tmp_path: Path) -> None:
    """Guard: gzip files of two members (as pigz or bgzip may write) or with trailing zeros (tape
    padding, which gzip ignores) keep reading."""
    volume = np.random.default_rng(52).integers(0, 200, (12, 10, 4)).astype(np.int16)
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    half = len(raw) // 2
    for name, data in (
        ("members.nii.gz", gzip.compress(raw[:half]) + gzip.compress(raw[half:])),
        ("padded.nii.gz", gzip.compress(raw) + bytes(512)),
    ):
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(read_image(tmp_path / name).array, volume)


def test_png_whose_compressed_data_stops_after_the_last_row_is_refused(tmp_path: Path) -> None:
    """A PNG whose zlib stream is cut after the bytes of its last row (its end and checksum gone),
    or whose checksum is wrong, was decoded as complete: Pillow stops at the last row and never
    checks the stream. Now the stream must reach its end, checksum verified."""
    raw = b"".join(b"\x00" + bytes([y * 7 % 256]) * 30 for y in range(20))
    whole = zlib.compress(raw, 9)
    for name, stream in (("cut.png", whole[:-4]), ("checksum.png", whole[:-1] + b"\x00")):
        path = tmp_path / name
        path.write_bytes(png_bytes_with_stream(30, 20, stream))
        with pytest.raises(InputError, match="unreadable or corrupt image"):
            read_image(path)
    path = tmp_path / "whole.png"
    path.write_bytes(png_bytes_with_stream(30, 20, whole))
    assert read_image(path).array.shape == (20, 30)


def png_bytes_with_stream(width: int, height: int, stream: bytes) -> bytes:
    """An 8-bit grey PNG whose IDAT is `stream` as given (compressed data, cut or damaged)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )


def test_prompt_volume_with_nan_outside_the_chosen_slices_is_refused(
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A prompt volume was checked only on the slices chosen as prompts, so NaN elsewhere in it was
    accepted (exit 0) while the same volume as a query is refused. Now it is refused as a prompt
    too, whichever slices are chosen."""
    volume = np.random.default_rng(61).random((14, 12, 10)).astype(np.float32)
    labels = np.zeros((14, 12, 10), np.uint8)
    labels[3:10, 3:9, 4:6] = 1
    volume[0, 0, 9] = np.nan  # slice 9: no label, far from the labelled extent
    image, label_path, query = tmp_path / "v.nii.gz", tmp_path / "l.nii.gz", tmp_path / "q.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), label_path)
    nib.save(nib.Nifti1Image(np.nan_to_num(volume), np.eye(4)), query)
    out = tmp_path / "out"
    argv = [
        "segment",
        "--prompt-volume",
        str(image),
        str(label_path),
        "--prompt-slices",
        "2",
        "--label",
        "1",
        "--query",
        str(query),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--no-progress",
    ]
    assert main(argv) == 2
    one_error_line(capsys, f"{image}: volume contains non-finite intensities")
    assert files_in(out) == []


def test_torch_allocator_failure_in_a_batch_job_fails_that_job_only(
    prompt_args: list[str],
    query: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In `promptseg batch`, a MemoryError fails its job and the run goes on; torch's allocator
    failing (a RuntimeError) used to end the whole run. Now it fails its prompt set's jobs too."""
    from promptseg.engine.segmenter import Segmenter

    real = Segmenter.segment_labels
    calls: list[int] = []

    def first_fails(self: Segmenter, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            allocate_too_much()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment_labels", first_fails)
    image, mask = prompt_args[1], prompt_args[2]
    other = write_png(tmp_path / "other_mask.png", (1 - np.asarray(Image.open(mask)) // 255) * 255)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"query": str(query), "prompts": [[image, mask]], "out": "first"})
        + "\n"
        + json.dumps({"query": str(query), "prompts": [[image, str(other)]], "out": "second"})
        + "\n"
    )
    out = tmp_path / "out"
    argv = ["batch", str(jobs), "--out", str(out), "--checkpoint", str(tiny_checkpoint)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 1
    rows = (out / "summary.csv").read_text()
    assert "first,failed" in rows and "second,done" in rows, rows
    assert "DefaultCPUAllocator: can't allocate memory" in rows
    assert "promptseg: job first failed:" in capsys.readouterr().err
