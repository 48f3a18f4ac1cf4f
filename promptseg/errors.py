"""Errors that PromptSeg reports to users as one line naming the offending input."""

from __future__ import annotations

import os


class PromptSegError(Exception):
    """Base class of every error PromptSeg reports to a user as one line."""


class InputError(PromptSegError):
    """Bad user input: the message names the input (file path or argument) and the problem.

    >>> str(InputError("scan.nii.gz", "4D input is not supported"))
    'scan.nii.gz: 4D input is not supported'
    """

    def __init__(self, source: str | os.PathLike | None, problem: str) -> None:
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")


class CheckpointError(PromptSegError):
    """A checkpoint that cannot be loaded (missing, corrupt, pickle-bearing, or of another
    configuration)."""


def short_reason(exc: BaseException) -> str:
    """`ExcType: first line of the message` (just `ExcType` for an empty message), at most 120
    characters.

    >>> short_reason(OSError("No space left on device\\nmore detail"))
    'OSError: No space left on device'
    >>> short_reason(KeyError())
    'KeyError'
    """
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
