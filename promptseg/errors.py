"""Errors that PromptSeg reports to users as one line naming the offending input."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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


# Messages of allocation failures that torch raises as RuntimeError, not MemoryError (the CPU
# allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate ... bytes", and
# "not enough memory: you tried to allocate ..." from some builds and allocators).
_ALLOCATOR_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError and for the RuntimeErrors torch raises when an allocation fails
    (torch.OutOfMemoryError, and the CPU allocator's plain RuntimeError), so that both become the
    same one-line error.

    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    True
    >>> is_out_of_memory(RuntimeError("shape mismatch"))
    False
    """
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(message in text for message in _ALLOCATOR_MESSAGES)


@contextlib.contextmanager
def allocation_failures_as_memory_errors() -> Iterator[None]:
    """Within the block, torch's allocator failing (a RuntimeError for which is_out_of_memory
    holds) raises MemoryError instead, for callers that handle running out of memory as such."""
    try:
        yield
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        raise MemoryError(str(error)) from None
