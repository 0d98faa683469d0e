"""Content-addressed cache: keys, unit folders, manifests, memos and per-unit locks.

A *unit* is one output of a stage (e.g. the features of one backbone) living in
`<cache root>/<stage>/<unit>/`. It is valid only if its `manifest.json` exists, its key equals the
key computed from the current config, and every file it lists is present with the size and sha256
recorded in the manifest when it was written (pipeline/integrity.py). The manifest is written last,
atomically (pipeline/atomic.py), so a run killed at any point leaves a unit that reads as invalid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import explain_os_error, write_json_atomic
from .errors import CacheError
from .integrity import DamagedArtifact, damage, verify_files

MANIFEST = "manifest.json"
LOCK = ".lock"
# Sub-results a unit can reuse across its own rebuilds (e.g. a head's hyper-parameter search, which
# does not depend on what the final fit uses), each under its own key; explicit invalidation and
# --force drop them, a settings change does not.
MEMO = "memo"
MEMOS_KEPT = 8


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


def require_intact(path: str | Path) -> Path:
    """`path` if it is listed in its unit's manifest with a matching digest; DamagedArtifact otherwise.

    For readers that open an artifact outside the runner (predict, the report's own tables), so a
    file damaged after the runner checked it is never used.
    """
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None or path.name not in manifest.get("files", []):
        raise DamagedArtifact(f"{path} is not part of a finished unit; rerun `make all` to build it")
    reason = damage(path, (manifest.get("digests") or {}).get(path.name))
    if reason is not None:
        raise DamagedArtifact(f"{path.parent}: {reason}; rerun `make all` to rebuild it")
    return path


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
        raise explain_os_error(error, directory) from None
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
