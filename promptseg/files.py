"""Files every layer writes: atomic replacement, folders of outputs, and file-name extensions.

The ground floor of the package (it imports nothing of promptseg but its errors): image writers
(promptseg.data.io), weights (promptseg.model.weights), training checkpoints, reports and exported
graphs all go through `atomic_write` or `atomic_write_unchecked`, so an output is either absent, the
old file or the complete new one (docs/design.md section 4).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from promptseg.errors import InputError, short_reason

try:
    import fcntl
except ImportError:  # not POSIX: output folders are not locked
    fcntl = None


def file_extension(path: str | os.PathLike) -> str:
    """The lower-case extension of `path`, treating ".nii.gz" as one extension ("" when none)."""
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(name)[1]


def strip_extension(name: str) -> str:
    """`name` without its (possibly double, ".nii.gz") extension."""
    ext = file_extension(name)
    return name[: len(name) - len(ext)] if ext else name


def _default_file_mode() -> int:
    """The mode open() gives new files under this process's umask (read once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


Writer = Callable[[str], None]  # fills the temporary file whose path it is given

# Temporary files are named ".<stem>.promptseg-<pid>-<random><ext>" beside their output, so a later
# run
# can tell ours from anything else and remove those whose process is gone (sweep_stale_temporaries).
_TEMPORARY_NAME = re.compile(r"^\..*\.promptseg-(?P<pid>\d+)-[a-z0-9_]{8}(\.[^.]+)*$")


def refuse_existing(paths: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """InputError naming the first of `paths` that exists (a folder where a file is wanted is named
    as such), unless `overwrite`: the one check every command makes before it writes outputs."""
    for path in paths:
        if os.path.isdir(path):
            raise InputError(path, "output path is a folder, expected a file name")
        if os.path.exists(path) and not overwrite:
            raise InputError(path, "output exists; pass --overwrite to replace it")


def atomic_write(path: str | os.PathLike, writer: Writer, overwrite: bool = False) -> None:
    """Call `writer(temporary_path)` then move the result onto `path` in one step (see
    atomic_write_unchecked).

    If `writer` raises, the temporary file is removed and the exception propagates: `path` is never
    left half-written. An existing `path` is refused unless `overwrite`. Missing parent folders are
    created. A failure of the file system (disk full, no permission) is an InputError naming `path`.
    """
    atomic_write_group([(path, writer)], overwrite)


def atomic_write_group(
    outputs: Sequence[tuple[str | os.PathLike, Writer]], overwrite: bool = False
) -> None:
    """Write several files as one unit: all of them or none.

    Each (path, writer) is written to a flushed temporary file beside its path first; only when all
    exist are they moved into place, together, under an exclusive lock of their folders (so two
    processes writing the same files cannot interleave them). If anything fails or the process is
    interrupted, the temporary files and the files already moved are removed (with `overwrite`, the
    files they replaced are gone too). Existing paths are refused unless `overwrite`. A failure of
    the file system is an InputError naming the path.
    """
    paths = [os.fspath(path) for path, _ in outputs]
    refuse_existing(paths, overwrite)
    temporaries: dict[str, str] = {}
    moved: list[str] = []
    current = paths[0] if paths else ""
    try:
        for path, (_, writer) in zip(paths, outputs):
            current = path
            temporaries[path] = _write_temporary(path, writer)
        folders = sorted({os.path.dirname(os.path.abspath(path)) for path in paths})
        with contextlib.ExitStack() as locks:
            for folder in folders:
                locks.enter_context(_folder_lock(folder))
            for path in paths:
                current = path
                _move_into_place(temporaries[path], path, overwrite)
                del temporaries[path]
                moved.append(path)
        for folder in folders:
            _fsync_folder(folder)
    except BaseException as exc:
        for leftover in [*temporaries.values(), *moved]:
            with contextlib.suppress(OSError):
                os.remove(leftover)
        if isinstance(exc, FileExistsError) and os.path.exists(
            current
        ):  # another process created it meanwhile
            raise InputError(
                current, "output exists (created while writing); pass --overwrite to replace it"
            ) from None
        if isinstance(exc, OSError):
            raise InputError(current, f"cannot write output ({short_reason(exc)})") from None
        raise


def atomic_write_unchecked(path: str | os.PathLike, writer: Writer, overwrite: bool) -> None:
    """atomic_write without its checks, lock and messages: file-system failures propagate as
    OSError.

    `writer(temporary_path)` fills a temporary file in `path`'s folder (created when missing) that
    keeps `path`'s extension (writers such as nibabel choose the format from it). The file gets the
    mode the umask gives, is flushed to the disk, then moved onto `path` (replacing it if
    `overwrite`, else FileExistsError when `path` exists by then), and the folder is flushed: `path`
    is always absent, the old file or the complete new one. On any failure the temporary file is
    removed.
    """
    path = os.fspath(path)
    temporary = _write_temporary(path, writer)
    try:
        _move_into_place(temporary, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _write_temporary(path: str, writer: Writer) -> str:
    """A flushed temporary file beside `path` (folder created when missing) filled by `writer`, with
    the mode the umask gives; removed again if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        dir=folder,
        prefix=f".{strip_extension(os.path.basename(path))}.promptseg-{os.getpid()}-",
        suffix=file_extension(path),
    )
    os.close(fd)
    try:
        writer(temporary)
        os.chmod(
            temporary, _FILE_MODE
        )  # mkstemp makes owner-only files; outputs get the usual mode
        _fsync(temporary)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return temporary


def _move_into_place(temporary: str, path: str, overwrite: bool) -> None:
    """Move `temporary` onto `path` in one step (replacing it if `overwrite`, else
    FileExistsError)."""
    if overwrite:
        os.replace(temporary, path)
    else:
        _create_exclusively(temporary, path)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `folder` itself: no lock file is left behind.
    Where flock is unavailable (not POSIX) the block runs unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_folder(folder: str) -> None:
    if os.name == "posix":  # folders cannot be opened for fsync elsewhere
        _fsync(folder)


def _process_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files our writers left in `folder` when their process was killed
    (SIGKILL, power loss): those named by _TEMPORARY_NAME whose process no longer exists. Returns
    their paths. Files of live processes (on this machine) and every other file are left alone."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMPORARY_NAME.match(name)
        if match is None or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
    return removed


def _fsync(path: str) -> None:
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusively(temporary: str, path: str) -> None:
    """Move `temporary` to `path` in one step unless `path` exists by now (FileExistsError): a file
    another process wrote meanwhile is never replaced. Where hard links are unsupported, rename."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.exists(path):
            raise FileExistsError(path) from None
        os.replace(temporary, path)
    else:
        os.remove(temporary)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically."""

    def writer(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, writer, overwrite=overwrite)


def write_json_unchecked(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Replace `path` by `data` as indented, key-sorted JSON (atomic_write_unchecked: OSError
    propagates)."""

    def writer(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)

    atomic_write_unchecked(path, writer, overwrite=True)
