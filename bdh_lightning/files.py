"""Writing files safely: whole or not at all, never over an existing file unless asked, one line when it fails.

Every writer (checkpoints, exports, generated text, inspect reports, prepared folders) goes through here: a
temporary name beside the target, synced to disk, then renamed over it, so a full disk, a kill or an
unwritable folder leaves the previous file as it was and nothing half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .errors import ResourceError, UsageError, one_line

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TORCH_WRITER_WORDS = ("write", "inline_container", "PytorchStreamWriter")
NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def failure_reason(error: BaseException) -> str:
    """What the OS (or torch's writer) said, in a few words: 'No space left on device', 'Permission denied'."""
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return one_line(error)


def is_disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in DISK_FULL or "No space left" in str(error)


def is_write_error(error: BaseException) -> bool:
    """An OSError, or torch's zip writer failing: a RuntimeError ('file write failed', or 'unexpected pos' when
    the disk filled up under it)."""
    return isinstance(error, OSError) or (
        isinstance(error, RuntimeError) and any(word in str(error) for word in TORCH_WRITER_WORDS)
    )


def write_cause(error: BaseException, folder: Path) -> BaseException:
    """The error to report: torch's writer words a full disk as 'unexpected pos', so a disk with (almost) no room
    left, measured while the partial file still holds its space, is named as the OS names it."""
    if is_disk_full(error):
        return error
    try:
        full = shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return error
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else error


def write_failure(what: str, error: BaseException, then: str = "nothing was written") -> ResourceError:
    """The one line for a write that failed: what, why, and (`then`) what is left and what to do."""
    hint = "; free some space or write elsewhere" if is_disk_full(error) and "free some space" not in then else ""
    return ResourceError(f"cannot write {what} ({failure_reason(error)}){hint}; {then}")


def output_paths(
    paths: list[Path], overwrite: bool = False, flag: str = "--output", folders: bool = False
) -> list[Path]:
    """`paths` if each can be written: in a folder that exists, not an existing file (or, with `folders`, folder)
    unless `overwrite`, and without `folders` not a folder at all. Devices and pipes (/dev/stdout) are written in
    place, so they count as new. UsageError naming the path otherwise."""
    for path in paths:
        if path.is_dir() and not folders:
            raise UsageError(f"{flag} {path} is a directory; give a file name")
        exists = path.is_file() or (folders and path.exists())
        if exists and not overwrite:
            raise UsageError(f"{flag}: {path} exists; give --overwrite true to replace it, or another {flag}")
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")
    return paths


def temporary_beside(path: Path) -> Path:
    """A hidden name in the target's own folder (a rename across file systems would be a copy)."""
    return path.with_name(f".{path.name}.part-{os.getpid()}")


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sync_tree(path: Path) -> None:
    """Flush a written file, or every file of a written folder, to disk."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def replace_atomically(temporary: Path, final: Path) -> None:
    """Move a finished file or folder into place; a folder replaces an old one only once it is whole."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if temporary.is_dir() and final.exists():
            final.unlink()
        os.replace(temporary, final)
    sync_folder(final.parent)


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str | None = None, folder: bool = False):
    """`with atomic_output(path) as temporary:` write a file (or, with `folder`, fill a new folder) at `temporary`;
    on leaving it is synced and renamed over `path`. On any failure the temporary is removed, `path` keeps its old
    contents, and an OSError (or torch's writer's RuntimeError) becomes `write_failure`'s one line."""
    path = Path(path)
    temporary = temporary_beside(path)
    try:
        if folder:
            temporary.mkdir()
        yield temporary
        sync_tree(temporary)
        replace_atomically(temporary, path)
    except BaseException as error:
        cause = write_cause(error, path.parent) if is_write_error(error) else None
        remove(temporary)
        if cause is not None:
            raise write_failure(what or str(path), cause) from None
        raise


def write_atomically(path: str | Path, data: bytes | str, what: str | None = None) -> Path:
    """Write `data` (text as UTF-8) to `path`, whole or not at all."""
    with atomic_output(path, what) as temporary:
        temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
