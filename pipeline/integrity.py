"""Content integrity: file digests, checks of files against the digests a manifest recorded, and
sealed files (a header carrying the digest of the payload, checked on every read) for files that
live outside a manifest (resume checkpoints, memos), so a damaged one is discarded, never used.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic import atomic_path
from .errors import CacheError


class DamagedArtifact(CacheError):
    """An artifact whose content no longer matches the digest recorded when it was written."""


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


def damage(path: Path, recorded: dict | None) -> str | None:
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
    reasons = _in_parallel(lambda name: damage(Path(directory) / name, recorded.get(name)), names)
    return next((reason for reason in reasons if reason is not None), None)


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
