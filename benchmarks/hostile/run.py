"""Hostile-input harness (issue 15): fuzzed NIfTI and PNG files through the CLI and the Python API.

Each fuzzed file (benchmarks.hostile.fuzz, fixed seed) is used as a query, as a prompt image and as
a prompt mask, by `promptseg segment` run in-process (promptseg.cli.main with stderr captured) and
by the Segmenter API; a sample also runs as a real `python -m promptseg segment` subprocess. Each
run must keep the promise:

- CLI: exit 0 with complete, valid outputs (mask, probabilities and overlay readable, of one shape,
  probabilities finite in [0, 1], no other file), or a non-zero exit whose stderr is optional
  `promptseg: warning:` lines and then exactly one `promptseg: error:` line, no traceback, and no
  file (hidden temporaries included) left in the output folder;
- API: valid finite probabilities of the query's shape, or a PromptSegError (nothing else);
- and a file damaged beyond doubt (fuzz.Case.must_refuse: data missing, a size its data cannot
  fill, NaN/Inf intensities) must be refused, in every role.

The prompt is a JSRT chest X-ray and its lung labels (label 1) from the shared data, as in the
issue's reproducer; the model is a tiny random-initialised one by default (the promise does not
depend on the weights, and it keeps the run short), or --checkpoint FILE / packaged.

    OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 5 python -m benchmarks.hostile.run \
        --data /work/shared/data --out benchmarks/results/hostile-inputs.md

--limit N runs every k-th file only (N files, for a quick look); --subprocess N runs N sampled files
as subprocesses too (default 30).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from benchmarks.hostile.fuzz import SEED, Case, counts, fuzz_cases
from promptseg.cli import main
from promptseg.errors import PromptSegError
from promptseg.model.weights import packaged_weights_path

REPO = Path(__file__).resolve().parents[2]
ROUTES = ("cli-query", "cli-prompt-image", "cli-prompt-mask", "api-query", "api-prompt")
PROMPT_CASE = ("jsrt/images/JPCLN001.png", "jsrt/labels/JPCLN001.png")
QUERY_CASE = "jsrt/images/JPCLN002.png"
CASE_SECONDS = 120


@dataclass
class Outcome:
    """One run of one case through one route: passed, or failed with a short cause."""

    case: Case
    route: str
    passed: bool
    cause: str = ""
    refused: bool = False  # a clean one-line refusal (exit non-zero / PromptSegError)


class CaseTimeout(BaseException):
    """Raised by SIGALRM when one run takes longer than CASE_SECONDS."""


def _alarm(signum: int, frame: object) -> None:
    raise CaseTimeout


def tiny_checkpoint(folder: Path) -> Path:
    """Weights of a small random-initialised model (seed 0), as the tests use."""
    from promptseg.model import ModelConfig, PromptSegNet
    from promptseg.model.weights import save_weights

    torch.manual_seed(0)
    config = ModelConfig(
        resolution=32,
        widths=(8, 16, 32, 32),
        head_dim=16,
        attention_depth=1,
        blocks_per_stage=1,
        label_propagation=True,
    )
    path = folder / "tiny.safetensors"
    save_weights(PromptSegNet(config), path)
    return path


class Bases:
    """Valid images and masks matching each fuzzed file's base shape (written once per shape)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[tuple[tuple[int, ...], bool], tuple[Path, Path]] = {}

    def pair(self, shape: tuple[int, ...], nifti: bool) -> tuple[Path, Path]:
        """(image, mask with label 1) of `shape`: PNG for 2D PNG cases, NIfTI otherwise."""
        key = (shape, nifti)
        if key not in self.made:
            grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
            inside = (grid**2).sum(axis=0) <= 0.5
            image = (60 + 120 * inside).astype(np.uint8)
            tag = "x".join(map(str, shape))
            if nifti:
                paths = (
                    self.folder / f"base-{tag}.nii.gz",
                    self.folder / f"base-{tag}_labels.nii.gz",
                )
                affine = np.diag([0.8, 0.8, 2.5, 1.0])
                nib.save(nib.Nifti1Image(image.astype(np.int16), affine), paths[0])
                nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), paths[1])
            else:
                paths = (self.folder / f"base-{tag}.png", self.folder / f"base-{tag}_mask.png")
                Image.fromarray(image).save(paths[0])
                Image.fromarray(inside.astype(np.uint8)).save(paths[1])
            self.made[key] = paths
        return self.made[key]


def check_stderr(err: str) -> str:
    """'' when `err` is optional warning lines then one error line; else what is wrong."""
    lines = err.splitlines()
    if any("Traceback" in line for line in lines):
        return "traceback on stderr"
    if not lines:
        return "non-zero exit without an error line"
    if not lines[-1].startswith("promptseg: error: "):
        return f"last stderr line is not an error: {lines[-1][:70]!r}"
    stray = [line for line in lines[:-1] if not line.startswith("promptseg: warning: ")]
    if stray:
        return f"stray stderr line: {stray[0][:70]!r}"
    return ""


def check_outputs(folder: Path) -> str:
    """'' when `folder` holds complete valid outputs of one query (mask, prob, overlay)."""
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    hidden = [n for n in names if n.startswith(".")]
    if hidden:
        return f"hidden file left after success: {hidden[0]}"
    kinds = {n.rsplit("_", 1)[-1].split(".")[0] for n in names}
    if kinds != {"mask", "prob", "overlay"}:
        return f"outputs {sorted(kinds)} instead of mask, prob, overlay"
    arrays = {}
    for name in names:
        path = folder / name
        kind = name.rsplit("_", 1)[-1].split(".")[0]
        try:
            if name.endswith(".npy"):
                arrays[kind] = np.load(path, allow_pickle=False)
            elif name.endswith((".nii", ".nii.gz")):
                arrays[kind] = np.asarray(nib.load(path).dataobj)
            else:
                with Image.open(path) as image:
                    arrays[kind] = np.asarray(image)
        except Exception as exc:  # noqa: BLE001 (any unreadable output is a failure)
            return f"unreadable output {name}: {type(exc).__name__}"
    mask, prob = arrays["mask"], arrays["prob"]
    if mask.shape != prob.shape:
        return f"mask shape {mask.shape} != probabilities shape {prob.shape}"
    if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1:
        return "probabilities not finite in [0, 1]"
    if not set(np.unique(mask).tolist()) <= {0, 1, 255}:
        return "mask values outside 0/1/255"
    return ""


def failure_cause(exc: BaseException) -> str:
    """'uncaught Type at file:line' of the innermost promptseg frame (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "promptseg" in f.filename and "benchmarks" not in f.filename]
    frame = (ours or frames or [None])[-1]
    where = "" if frame is None else f" at {Path(frame.filename).name}:{frame.lineno}"
    return (
        f"uncaught {type(exc).__name__}{where}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"
    )


def run_cli(argv: list[str], out: Path) -> tuple[bool, str, bool]:
    """Run `promptseg` in-process: (passed, cause, refused)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except CaseTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 (anything escaping main is a failure)
        return False, failure_cause(exc), False
    if code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):  # main took the harness's own stop
        raise SystemExit(code)
    return judge_cli(code, err.getvalue(), out)


def judge_cli(code: int, err: str, out: Path) -> tuple[bool, str, bool]:
    """(passed, cause, refused) of a finished CLI run with exit `code` and stderr `err`."""
    if code == 0:
        problem = check_outputs(out)
        stray = [
            line
            for line in err.splitlines()
            if line and not line.startswith(("promptseg: warning: ", "segmented "))
        ]
        if stray:
            problem = problem or f"stray stderr line on success: {stray[0][:70]!r}"
        return not problem, problem, False
    problem = check_stderr(err)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not problem and left:
        problem = f"file left after failure: {left[0]}"
    return not problem, problem, not problem


def check_probabilities(values: object, shape: tuple[int, ...]) -> str:
    """'' when `values` is a finite float array in [0, 1] of `shape`."""
    array = np.asarray(values)
    if array.shape != shape:
        return f"probabilities shape {array.shape} != query shape {shape}"
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        return "probabilities not finite in [0, 1]"
    return ""


def run_api(call: Callable[[], str]) -> tuple[bool, str, bool]:
    """(passed, cause, refused) of one API call returning '' or a problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem = call()
    except CaseTimeout:
        raise
    except PromptSegError:
        return True, "", True
    except BaseException as exc:  # noqa: BLE001 (anything but PromptSegError is a failure)
        return False, failure_cause(exc), False
    return not problem, problem, False


class Harness:
    """Runs the routes of each case; keeps the outcomes."""

    def __init__(
        self,
        prompt: tuple[Path, Path],
        query: Path,
        work: Path,
        checkpoint: Path,
        case_seconds: int | None = None,
    ) -> None:
        """prompt: a valid (image, label map with label 1) pair; query: a valid 2D query;
        case_seconds: the time one run may take (SIGALRM, main thread only; None: unlimited)."""
        from promptseg.data.io import read_image
        from promptseg.engine.segmenter import Segmenter

        self.work, self.checkpoint, self.case_seconds = work, checkpoint, case_seconds
        self.bases = Bases(work / "bases")
        self.bases.folder.mkdir()
        self.prompt = [str(prompt[0]), str(prompt[1])]
        self.query = str(query)
        self.query_shape = read_image(query).array.shape[:2]
        self.segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
        self.encoded = self.segmenter.encode_prompts([self.prompt[0]], [self.prompt[1]], label=1)
        self.runs = 0

    def argv(self, out: Path, prompt: list[str], query: str) -> list[str]:
        return [
            "segment",
            *prompt,
            "--query",
            query,
            "--out",
            str(out),
            "--checkpoint",
            str(self.checkpoint),
            "--device",
            "cpu",
            "--no-progress",
            "--save-probabilities",
            "--overlay",
        ]

    def cli_args(self, case: Case, path: Path, route: str) -> tuple[list[str], str]:
        """(prompt arguments, query) of a CLI route for the fuzzed file at `path`."""
        nifti = case.ext != ".png"
        image, mask = self.bases.pair(case.base_shape, nifti)
        if route == "cli-query":
            return ["--prompt", *self.prompt, "--label", "1"], str(path)
        flag = "--prompt-volume" if nifti else "--prompt"
        extra = ["--prompt-slices", "2"] if nifti else []
        query = str(image) if nifti else self.query
        if route == "cli-prompt-image":
            return [flag, str(path), str(mask), "--label", "1", *extra], query
        return [flag, str(image), str(path), *extra], query

    def api_query(self, path: Path, nifti: bool) -> str:
        from promptseg.data.io import read_image

        if nifti:
            result = self.segmenter.segment_volume(str(path), self.encoded)
            return check_probabilities(result.probabilities, read_image(path).array.shape)
        probabilities = self.segmenter.segment_each([str(path)], self.encoded)[0]
        return check_probabilities(probabilities, read_image(path).array.shape[:2])

    def api_prompt(self, case: Case, path: Path) -> str:
        from promptseg.data.io import read_image

        nifti = case.ext != ".png"
        image, mask = self.bases.pair(case.base_shape, nifti)
        refusals = 0
        for images, masks in ((str(path), str(mask)), (str(image), str(path))):
            try:
                if nifti:
                    encoded = self.segmenter.encode_volume_prompts(images, masks, slices=2)
                    result = self.segmenter.segment_volume(str(image), encoded)
                    shape = read_image(image).array.shape
                    problem = check_probabilities(result.probabilities, shape)
                else:
                    encoded = self.segmenter.encode_prompts([images], [masks])
                    probabilities = self.segmenter.segment_each([self.query], encoded)[0]
                    problem = check_probabilities(probabilities, self.query_shape)
            except PromptSegError:
                refusals += 1
                continue
            if problem:
                return problem
        if refusals == 2:
            raise PromptSegError("both prompt uses refused")
        return ""

    def run_case(self, case: Case, routes: tuple[str, ...]) -> list[Outcome]:
        folder = Path(tempfile.mkdtemp(dir=self.work))
        path = case.write(folder)
        outcomes = []
        for route in routes:
            self.runs += 1
            if self.case_seconds:
                signal.signal(signal.SIGALRM, _alarm)
                signal.alarm(self.case_seconds)
            try:
                if route.startswith("cli"):
                    out = folder / f"out-{route}"
                    prompt, query = self.cli_args(case, path, route)
                    passed, cause, refused = run_cli(self.argv(out, prompt, query), out)
                elif route == "api-query":
                    passed, cause, refused = run_api(
                        lambda: self.api_query(path, case.ext != ".png")
                    )
                else:
                    passed, cause, refused = run_api(lambda: self.api_prompt(case, path))
            except CaseTimeout:
                passed, cause, refused = False, f"took over {self.case_seconds} s", False
            finally:
                if self.case_seconds:
                    signal.alarm(0)
            if passed and not refused and case.must_refuse:
                passed, cause = False, "a damaged file was accepted (silent garbage)"
            outcomes.append(Outcome(case, route, passed, cause, refused))
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        return outcomes

    def run_subprocess(self, case: Case) -> Outcome:
        """The cli-query route as a real `python -m promptseg` process (C-level stderr too)."""
        folder = Path(tempfile.mkdtemp(dir=self.work))
        path = case.write(folder)
        out = folder / "out"
        prompt, query = self.cli_args(case, path, "cli-query")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "promptseg", *self.argv(out, prompt, query)],
                capture_output=True,
                text=True,
                env=env,
                timeout=CASE_SECONDS,
            )
            passed, cause, refused = judge_cli(done.returncode, done.stderr, out)
            if passed and not refused and case.must_refuse:
                passed, cause = False, "a damaged file was accepted (silent garbage)"
        except subprocess.TimeoutExpired:
            passed, cause, refused = False, f"took over {CASE_SECONDS} s", False
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        return Outcome(case, "subprocess-query", passed, cause, refused)


def report(
    outcomes: list[Outcome], cases: list[Case], command: str, seconds: float, seed: int
) -> str:
    """The results markdown: counts per category and route, failures by cause."""
    lines = [
        "# Hostile-input harness (issue 15)",
        "",
        f"Command: `{command}`",
        "",
        f"{len(cases)} fuzzed files (seed {seed}), {len(outcomes)} runs, "
        f"{sum(o.passed for o in outcomes)} passed, {sum(not o.passed for o in outcomes)} failed; "
        f"{sum(o.refused for o in outcomes)} of the passes are one-line refusals "
        f"({seconds:.0f} s).",
        "",
        "| category | files | runs | passed | refused (one line) | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    files = counts(cases)
    for category in files:
        mine = [o for o in outcomes if o.case.category == category]
        lines.append(
            f"| {category} | {files[category]} | {len(mine)} | {sum(o.passed for o in mine)} | "
            f"{sum(o.refused for o in mine)} | {sum(not o.passed for o in mine)} |"
        )
    lines += [
        "",
        "| route | runs | passed | refused (one line) | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for route in dict.fromkeys(o.route for o in outcomes):
        mine = [o for o in outcomes if o.route == route]
        lines.append(
            f"| {route} | {len(mine)} | {sum(o.passed for o in mine)} | "
            f"{sum(o.refused for o in mine)} | {sum(not o.passed for o in mine)} |"
        )
    failed = Counter((o.route, o.cause) for o in outcomes if not o.passed)
    lines += ["", "## Failures by cause", ""]
    if not failed:
        lines.append("None.")
    for (route, cause), number in failed.most_common():
        example = next(o.case.filename for o in outcomes if (o.route, o.cause) == (route, cause))
        lines.append(f"- {number} x {route}: {cause} (e.g. {example})")
    return "\n".join(lines) + "\n"


def main_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, help="results markdown (default: print it)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--limit", type=int, default=0, help="run N evenly spread files only")
    parser.add_argument("--subprocess", type=int, default=30, metavar="N")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--checkpoint", help="weights (default: a tiny random model; 'packaged')")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit")
    args = parser.parse_args(argv)
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    cases = fuzz_cases(args.seed)
    if args.limit:
        cases = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, args.limit)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="promptseg-hostile-") as work:
        if args.checkpoint is None:
            checkpoint = tiny_checkpoint(Path(work))
        elif args.checkpoint == "packaged":
            checkpoint = packaged_weights_path()
        else:
            checkpoint = Path(args.checkpoint)
        data = args.data.resolve()
        prompt = (data / PROMPT_CASE[0], data / PROMPT_CASE[1])
        harness = Harness(prompt, data / QUERY_CASE, Path(work), checkpoint, CASE_SECONDS)
        outcomes: list[Outcome] = []
        for number, case in enumerate(cases, 1):
            outcomes += harness.run_case(case, tuple(args.routes))
            if number % 100 == 0:
                failed = sum(not o.passed for o in outcomes)
                print(f"{number}/{len(cases)} files, {failed} failed runs", file=sys.stderr)
        sample = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, args.subprocess)]
        for case in sample if args.subprocess else []:
            outcomes.append(harness.run_subprocess(case))
    seconds = time.perf_counter() - started
    command = (
        "OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 5 python -m benchmarks.hostile.run "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    )
    text = report(outcomes, cases, command, seconds, args.seed)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 1 if any(not o.passed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main_cli())
