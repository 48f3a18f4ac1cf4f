"""The session's clock and its subprocesses: a budget counted from the start, one log for every
command's output, and commands stopped cleanly (SIGINT, then a kill) when their time is up.

Standard library only, so that it imports before the vendored packages are on the path.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.5


class Budget:
    """The seconds of --budget-s left, counted from the session's start."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def allow(self, wanted: float, keep: float = 0.0) -> float:
        """Seconds a part may take: `wanted`, but never into the last `keep` seconds of the
        budget."""
        return max(0.0, min(wanted, self.left() - keep))


class SessionLog:
    """One append-only file with every command's output under a header naming the command; status
    lines go to stdout as well, stamped with the session's elapsed seconds."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path = path
        self.budget = budget
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def write(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)

    def status(self, text: str) -> None:
        line = f"[{self.budget.elapsed():6.0f}s] {text}"
        print(line, flush=True)
        self.write(line + "\n")


@dataclass
class Outcome:
    """How one command ended: its exit status, its seconds, whether it was stopped (its time ran out
    or the monitor asked), and the end of its output."""

    returncode: int
    seconds: float
    stopped: bool
    tail: str

    def last_line(self) -> str:
        lines = [line.strip() for line in self.tail.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the command (Ctrl-C: pytest writes its report, training keeps its last checkpoint),
    up to `grace_s` to exit, then SIGKILL to its whole process group."""
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.wait()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group the command leads (e.g. data-loader workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(
    command: Sequence[str],
    log: SessionLog,
    timeout_s: float,
    env: dict[str, str],
    grace_s: float = 15.0,
    monitor: Callable[[float], bool] | None = None,
) -> Outcome:
    """Run `command` in the repository root with its output appended to the log; stop it after
    `timeout_s` seconds, or when `monitor(elapsed)` (called every POLL_S) returns True."""
    log.write(f"\n===== $ {shlex.join(command)}  (time limit {timeout_s:.0f} s)\n")
    offset = log.path.stat().st_size
    started = time.monotonic()
    stopped = False
    with open(log.path, "ab") as output:
        process = subprocess.Popen(
            list(command),
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed >= timeout_s or (monitor is not None and monitor(elapsed)):
                    stopped = True
                    stop_process(process, grace_s)
                    break
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                stop_process(process, grace_s)
            kill_group(process)
    seconds = time.monotonic() - started
    with open(log.path, "rb") as handle:
        handle.seek(max(offset, log.path.stat().st_size - 4096))
        tail = handle.read().decode("utf-8", errors="replace")
    log.write(
        f"===== exit {process.returncode}{' (stopped)' if stopped else ''} after {seconds:.1f} s\n"
    )
    return Outcome(process.returncode, seconds, stopped, tail)
