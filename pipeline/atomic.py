"""Atomic writes: a file appears whole under its name or not at all, and a failed write is one line.

`atomic_path` writes beside the destination, fsyncs and renames; `finalize` publishes a file that was
written in place under another name; `writing` turns a library's failed write into a CacheError; a
free-space check stops writers that fail badly on a full disk. The PIPELINE_FAULT hook (tests only)
interrupts these writes at exact points.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def explain_os_error(error: OSError, path: Path) -> CacheError:
    reason = {
        28: "the disk is full",
        13: "permission denied",
        30: "the file system is read-only",
        20: "a folder on its path is a file",
    }.get(error.errno, error.strerror or str(error))
    return CacheError(
        f"cannot write {path}: {reason}; free space or point [cache] root at a writable folder "
        "(earlier valid artifacts were left untouched)"
    )


# Library errors that mean "the bytes did not reach the disk" without being an OSError: torch.save
# raises RuntimeError from its C++ writer when the disk fills up.
_WRITE_FAILURE_MESSAGES = ("iostream error", "failed writing file", "file write failed")


def _write_failure(error: BaseException) -> str | None:
    """The message of a library write failure in `error` or the errors it arose from, if there is one."""
    while error is not None:
        if any(message in str(error) for message in _WRITE_FAILURE_MESSAGES):
            return str(error).strip().splitlines()[-1]
        error = error.__context__
    return None


# Test hook, not a user setting: PIPELINE_FAULT="<glob>:<action>[:<n>]" makes the n-th atomic write
# (1st by default) whose full destination path matches <glob> fail on purpose, so the reliability
# tests can interrupt the real stages at exact points. Actions:
#   kill        SIGKILL once the temporary file is written, before fsync and rename ("inside" the write)
#   kill-after  SIGKILL just after the rename (between two writes, e.g. between training epochs)
#   enospc      raise OSError(ENOSPC) before the rename, where a full disk reports it on fsync
#   full        point the temporary file at /dev/full, so the library's own write hits a real ENOSPC
FAULT_VARIABLE = "PIPELINE_FAULT"
FAULT_ACTIONS = ("kill", "kill-after", "enospc", "full")
_fault_matches: dict[str, int] = {}


def _planned_fault(path: Path) -> str | None:
    """The action PIPELINE_FAULT asks for on this write of `path`, if any (counts matching writes)."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return None
    pattern, action, *occurrence = spec.split(":")
    if action not in FAULT_ACTIONS:
        raise CacheError(f"{FAULT_VARIABLE}={spec!r}: action must be one of {', '.join(FAULT_ACTIONS)}")
    if not fnmatch.fnmatch(str(path), pattern):
        return None
    _fault_matches[spec] = _fault_matches.get(spec, 0) + 1
    return action if _fault_matches[spec] == int(occurrence[0] if occurrence else 1) else None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any failure the temporary file is removed and `path` keeps its previous content. The
    temporary name keeps the suffix so libraries that look at it (h5py, matplotlib) still work.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary_name = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
        os.close(descriptor)
        # mkstemp creates 0600; artifacts should get the usual permissions (0666 minus the umask).
        os.chmod(temporary_name, 0o666 & ~_UMASK)
    except OSError as error:
        raise explain_os_error(error, path) from None
    temporary = Path(temporary_name)
    fault = _planned_fault(path)
    if fault == "full":
        temporary.unlink()
        temporary.symlink_to("/dev/full")
    try:
        yield temporary
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault in ("enospc", "full"):  # some writers (numpy.save) only notice a full disk at fsync
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise explain_os_error(error, path) from None
    except RuntimeError as error:
        temporary.unlink(missing_ok=True)
        failure = _write_failure(error)
        if failure is None or isinstance(error, CacheError):
            raise
        raise CacheError(
            f"cannot write {path}: the write failed ({failure}), most "
            "likely because the disk is full; free space or point [cache] root at a writable folder "
            "(earlier valid artifacts were left untouched)"
        ) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fault == "kill-after":
        os.kill(os.getpid(), signal.SIGKILL)


# Inside `writing` and after it reported a failure: h5py objects freed after a full disk retry their
# flush while being deallocated, and each retry would print a traceback echoing the one-line error.
_quiet_write_failures = False


def _quiet_unraisable(unraisable) -> None:
    if _quiet_write_failures and _write_failure(unraisable.exc_value) is not None:
        return
    _previous_unraisable_hook(unraisable)


def _quiet_excepthook(kind, value, traceback) -> None:
    # Cython prints an ignored exception's full traceback through sys.excepthook before reporting it;
    # only those echoes (raised inside h5py's deallocation) are dropped, never a program's own error.
    if _quiet_write_failures and _write_failure(value) is not None and _raised_in_h5py(traceback):
        return
    _previous_excepthook(kind, value, traceback)


def _raised_in_h5py(traceback) -> bool:
    innermost = traceback
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    return innermost is not None and "h5py" in innermost.tb_frame.f_code.co_filename


_previous_unraisable_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
_previous_excepthook, sys.excepthook = sys.excepthook, _quiet_excepthook


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of `path` done inside the block (OSError, a library's disk-full error) into CacheError."""
    global _quiet_write_failures
    path = Path(path)
    quiet_before, _quiet_write_failures = _quiet_write_failures, True
    failed = False
    try:
        yield
    except CacheError:
        raise
    except OSError as error:
        raise explain_os_error(error, path) from None
    except RuntimeError as error:
        failure = _write_failure(error)
        if failure is None:
            raise
        failed = True
        raise CacheError(
            f"cannot write {path}: the write failed ({failure}), most likely because the disk is full; "
            "free space or point [cache] root at a writable folder "
            "(earlier valid artifacts were left untouched)"
        ) from None
    finally:
        _quiet_write_failures = quiet_before or failed


# Room kept free for a file's own bookkeeping (HDF5 metadata) on top of the data about to be written.
FREE_SPACE_MARGIN = 1 << 20


def require_free_space(path: str | Path, size: int) -> None:
    """CacheError, as for a full disk, unless the file system holding `path` has room for `size` more bytes.

    For writers that fail badly on a full disk (HDF5 can crash once a flush has failed), so they stop
    before the disk is full instead.
    """
    path = Path(path)
    try:
        status = os.statvfs(path.parent)
    except OSError as error:
        raise explain_os_error(error, path) from None
    if status.f_bavail * status.f_frsize < size + FREE_SPACE_MARGIN:
        raise explain_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Send what C libraries print on file descriptor 2 to /dev/null inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def finalize(partial: str | Path, path: str | Path) -> None:
    """Publish a file written in place under another name (a resumable partial file): fsync, then rename.

    Goes through the same fault hook and error messages as atomic_path.
    """
    partial, path = Path(partial), Path(path)
    fault = _planned_fault(path)
    with writing(path):
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault in ("enospc", "full"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
        _fsync_directory(path.parent)
    if fault == "kill-after":
        os.kill(os.getpid(), signal.SIGKILL)


def sweep_temporary_files(directory: Path) -> list[str]:
    """Remove temp files a killed run left behind (call only while holding the unit's lock)."""
    removed = []
    if Path(directory).is_dir():
        for path in Path(directory).glob(".*.tmp*"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
