"""Content-addressed cache: keys, manifests, atomic writes and per-unit locks.

A *unit* is one output of a stage (e.g. the features of one backbone) living in
`<cache root>/<stage>/<unit>/`. It is valid only if its `manifest.json` exists, its key equals the
key computed from the current config, and every file it lists is present with the size and sha256
recorded in the manifest when it was written. The manifest is written last, atomically, so a run
killed at any point leaves a unit that reads as invalid.

Files that live outside a manifest (resume checkpoints, memos) are *sealed*: a header carrying the
digest of the payload, checked on every read, so a damaged one is discarded, never used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import PipelineError

MANIFEST = "manifest.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
LOCK = ".lock"
# Sub-results a unit can reuse across its own rebuilds (e.g. a head's hyper-parameter search, which
# does not depend on what the final fit uses), each under its own key; explicit invalidation and
# --force drop them, a settings change does not.
MEMO = "memo"
MEMOS_KEPT = 8


class CacheError(PipelineError, RuntimeError):
    """A cache operation that cannot proceed (lock timeout, unwritable folder, disk full)."""


class DamagedArtifact(CacheError):
    """An artifact whose content no longer matches the digest recorded when it was written."""


def stable_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content always hashes equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def compute_key(stage: str, code_version: str, settings: Any, input_keys: dict[str, str]) -> str:
    """Key of one unit: its own settings, the keys of its inputs and the version of the code that makes it."""
    material = stable_json(
        {"stage": stage, "code_version": code_version, "settings": settings, "inputs": dict(sorted(input_keys.items()))}
    )
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def unit_dir(cache_root: Path, stage: str, unit: str) -> Path:
    return Path(cache_root) / stage / unit


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _explain_os_error(error: OSError, path: Path) -> CacheError:
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
        raise _explain_os_error(error, path) from None
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
        raise _explain_os_error(error, path) from None
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
        raise _explain_os_error(error, path) from None
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
        raise _explain_os_error(error, path) from None
    if status.f_bavail * status.f_frsize < size + FREE_SPACE_MARGIN:
        raise _explain_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)


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


# --- content digests ---------------------------------------------------------------------------------
HASH_BLOCK = 8 << 20
# Digests already computed in this process, by the file's identity and stat: a warm run checks each
# artifact once even when several stages read it. Never persisted, so damage on disk is always seen
# by the next process.
_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()


def _identity(path: Path) -> tuple:
    status = os.stat(path)
    return (str(Path(path).resolve()), status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (hex), computed at most once per process for an unchanged file."""
    identity = _identity(Path(path))
    with _digests_lock:
        known = _digests.get(identity)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    value = digest.hexdigest()
    with _digests_lock:
        _digests[identity] = value
    return value


def _in_parallel(function: Callable, items: list) -> list:
    """`function` over `items` on one thread per core (hashlib releases the GIL on large blocks)."""
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def digests_of(directory: Path, names: list) -> dict:
    """{name: {"bytes": size, "sha256": hex}} of files in `directory`, as a manifest records them."""
    directory = Path(directory)

    def describe(name: str) -> dict:
        path = directory / name
        try:
            return {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        except OSError as error:
            raise CacheError(
                f"cannot read {path} to record its digest ({error.strerror or error}); "
                "check the cache folder's permissions and rerun"
            ) from None

    return dict(zip(names, _in_parallel(describe, list(names)), strict=True))


def _damage(path: Path, recorded: dict | None) -> str | None:
    """Why the file at `path` does not match its recorded digest, or None when it does."""
    if recorded is None:
        return f"{path.name} has no recorded digest"
    try:
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            return f"{path.name} is damaged ({size} bytes, {recorded.get('bytes')} when written)"
        if file_digest(path) != recorded.get("sha256"):
            return f"{path.name} is damaged (its sha256 differs from the one recorded when it was written)"
    except FileNotFoundError:
        return f"output {path.name} is missing"
    except OSError as error:
        return f"{path.name} cannot be read ({error.strerror or error})"
    return None


def verify_files(directory: Path, manifest: dict) -> str | None:
    """None when every file the manifest lists matches its recorded size and sha256, else the first reason."""
    recorded = manifest.get("digests")
    if not isinstance(recorded, dict):
        return "its manifest records no content digests (made by an older version)"
    names = list(manifest.get("files", []))
    reasons = _in_parallel(lambda name: _damage(Path(directory) / name, recorded.get(name)), names)
    return next((reason for reason in reasons if reason is not None), None)


def require_intact(path: str | Path) -> Path:
    """`path` if it is listed in its unit's manifest with a matching digest; DamagedArtifact otherwise.

    For readers that open an artifact outside the runner (predict, the report's own tables), so a
    file damaged after the runner checked it is never used.
    """
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None or path.name not in manifest.get("files", []):
        raise DamagedArtifact(f"{path} is not part of a finished unit; rerun `make all` to build it")
    reason = _damage(path, (manifest.get("digests") or {}).get(path.name))
    if reason is not None:
        raise DamagedArtifact(f"{path.parent}: {reason}; rerun `make all` to rebuild it")
    return path


# --- sealed files ------------------------------------------------------------------------------------
SEAL = b"flowers-transfer sealed v1 sha256="


def write_sealed(path: str | Path, payload: bytes) -> None:
    """Write `payload` atomically behind a header holding its sha256, for files no manifest lists."""
    header = SEAL + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(header)
        handle.write(payload)


def read_sealed(path: str | Path) -> bytes:
    """The payload of a sealed file; DamagedArtifact when its header or digest does not match."""
    path = Path(path)
    with open(path, "rb") as handle:
        data = handle.read()
    header_end = data.find(b"\n")
    if not data.startswith(SEAL) or header_end < 0:
        raise DamagedArtifact(f"{path} is not a sealed file (damaged, or made by an older version)")
    payload = memoryview(data)[header_end + 1 :]
    if hashlib.sha256(payload).hexdigest().encode() != data[len(SEAL) : header_end]:
        raise DamagedArtifact(f"{path} is damaged (its sha256 differs from the one sealed in it)")
    return bytes(payload)


MANIFEST_DIGEST = "manifest_sha256"


def _manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(
        stable_json({name: value for name, value in manifest.items() if name != MANIFEST_DIGEST}).encode()
    ).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write a unit's manifest last and atomically, sealed by a digest of its own content."""
    write_json_atomic(Path(directory) / MANIFEST, {**manifest, MANIFEST_DIGEST: _manifest_digest(manifest)})


def read_manifest(directory: Path) -> dict | None:
    """The unit's manifest, or None when it is missing, unreadable or edited (each reads as absent)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get(MANIFEST_DIGEST) != _manifest_digest(manifest):
        return None
    return manifest


def invalid_reason(directory: Path, key: str) -> str | None:
    """None when the unit in `directory` is valid for `key`, else a short reason it must be rebuilt."""
    manifest = read_manifest(directory)
    if manifest is None:
        return "no manifest"
    if manifest.get("key") != key:
        return f"settings changed (key {str(manifest.get('key'))[:8]} -> {key[:8]})"
    for name in manifest.get("files", []):
        if not (Path(directory) / name).is_file():
            return f"output {name} is missing"
    return verify_files(directory, manifest)


def invalidate(directory: Path) -> bool:
    """Drop a unit's manifest so it reads as invalid; returns whether there was one."""
    manifest = Path(directory) / MANIFEST
    existed = manifest.exists()
    manifest.unlink(missing_ok=True)
    return existed


def memo_path(directory: Path, key: str, suffix: str) -> Path:
    """Where a unit keeps the memo for `key` (the caller writes it with atomic_path)."""
    return Path(directory) / MEMO / f"{key}{suffix}"


def prune_memos(directory: Path, keep: int = MEMOS_KEPT) -> None:
    """Keep the `keep` most recently written memos of a unit, so settings sweeps cannot fill the disk."""
    folder = Path(directory) / MEMO
    if folder.is_dir():
        memos = sorted(
            (path for path in folder.iterdir() if not path.name.startswith(".")),
            key=lambda path: path.stat().st_mtime,
            reverse=True,
        )
        for path in memos[keep:]:
            path.unlink(missing_ok=True)


def drop_memos(directory: Path) -> bool:
    """Forget every memo of a unit; returns whether there were any."""
    folder = Path(directory) / MEMO
    existed = folder.is_dir() and any(folder.iterdir())
    remove_tree(folder)
    return existed


def remove_tree(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def unit_lock(directory: Path, timeout_seconds: float = 3600.0, announce: Callable[[str], None] = print):
    """Exclusive lock on one unit so two concurrent runs never write the same outputs.

    The second run waits (saying so once, with the holder's pid) and then re-checks validity,
    which usually finds the first run's result and does no work.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK, "a+")  # noqa: SIM115 - held across the yield, closed by the finally below
    except OSError as error:
        raise _explain_os_error(error, directory) from None
    try:
        deadline = time.monotonic() + timeout_seconds
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    announce(f"waiting for {directory} (locked by pid {holder})")
                    announced = True
                if time.monotonic() > deadline:
                    raise CacheError(
                        f"{directory} is still locked after {timeout_seconds:.0f} s by another run; "
                        "wait for it to finish or raise [cache] lock_timeout_seconds"
                    ) from None
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
