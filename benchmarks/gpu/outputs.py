"""The session's output folder: what comes back from a device run (a few files, each of bounded
size, shallowly nested), the test report's one-line summary, and the log trimmed to fit.

Standard library only, so that it imports before the vendored packages are on the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

WEIGHTS_NAME = "promptseg-gpu.safetensors"
LOG_NAME = "session.log"
OUTPUT_NAMES = (
    "summary.md",
    "summary.json",
    "tests.xml",
    "kernels.json",
    "engine.json",
    "eval.json",
    WEIGHTS_NAME,
    LOG_NAME,
)
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_FOLDERS_DOWN = 2  # OUT/a/b/file comes back, OUT/a/b/c/file does not


def output_problems(folder: Path) -> list[str]:
    """What in `folder` would not come back from a device run (empty when everything would)."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    problems = (
        [f"{len(files)} files, at most {MAX_FILES} come back"] if len(files) > MAX_FILES else []
    )
    for path in files:
        relative = path.relative_to(folder)
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(
                f"{relative}: {path.stat().st_size / 2**20:.1f} MiB, over "
                f"{MAX_FILE_BYTES // 2**20} MiB"
            )
        if len(relative.parts) - 1 > MAX_FOLDERS_DOWN:
            problems.append(f"{relative}: more than {MAX_FOLDERS_DOWN} folders down")
    return problems


def trim_file(path: Path, limit: int = MAX_FILE_BYTES) -> bool:
    """Cut a text file over `limit` bytes to its first sixteenth of `limit` and as much of its end
    as fits, with a marker between them; True when it was cut."""
    size = path.stat().st_size
    if size <= limit:
        return False
    marker = (
        f"\n\n[... {size} bytes in all: the middle was cut to fit {limit} bytes ...]\n\n".encode()
    )
    head_bytes = limit // 16
    with open(path, "rb") as handle:
        head = handle.read(head_bytes)
        handle.seek(size - (limit - head_bytes - len(marker)))
        tail = handle.read()
    path.write_bytes(head + marker + tail)
    return True


@dataclass
class TestSummary:
    """Counts of a JUnit XML report and the ids of the tests that failed or errored."""

    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped

    def line(self) -> str:
        return (
            f"{self.passed} passed, {self.failures} failed, {self.errors} errors, {self.skipped} "
            "skipped "
            f"in {self.seconds:.1f} s"
        )


def junit_summary(path: Path) -> TestSummary | None:
    """The summary of pytest's --junitxml report at `path`; None when it is missing or
    unreadable."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    summary = TestSummary()
    for suite in root.iter("testsuite"):
        summary.tests += int(suite.get("tests", 0))
        summary.failures += int(suite.get("failures", 0))
        summary.errors += int(suite.get("errors", 0))
        summary.skipped += int(suite.get("skipped", 0))
        summary.seconds += float(suite.get("time", 0.0))
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            summary.failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return summary
