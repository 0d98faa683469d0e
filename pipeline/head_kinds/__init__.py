"""Head kinds registry: name -> settings table, selection on val, refit, save, load and prediction.

A head kind is what the heads stage fits on one backbone's cached features. Each kind is one module
of this package that declares its `[heads.<kind>]` settings dataclass and builds a `HeadKind`; the
registration lines at the bottom of this file add it. The heads stage, `make predict` and the config
only ever go through the registry, so a new kind is its module plus its registration line.

Every kind's functions work on a *payload*, a dict the kind alone reads: what `select` and `refit`
return, what `save` writes and `load` reads back. The stage adds `kind`, `backbone`, `class_names`
and `selected` to it before saving; `probabilities` and `predict` take it as saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PipelineError

if TYPE_CHECKING:
    import numpy


class HeadError(PipelineError, RuntimeError):
    """An unknown head kind, or a fitted head that cannot give a trustworthy result (values not finite)."""


@dataclass(frozen=True)
class Problem:
    """What a head's selection sees: fit rows (train, plus its augmented views when used), val rows,
    the number of classes, the feature normalisations to try and the seed. Never test."""

    fit: tuple  # (features [N, D] float32, labels [N] int64)
    val: tuple
    num_classes: int
    normalizations: list
    seed: int


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: its settings table and what the heads stage and `make predict` call."""

    name: str
    settings: type  # frozen dataclass of the kind's [heads.<name>] table (fields made with settings.setting)
    file_name: str  # the file the fitted head is saved to in its unit's folder (unique among kinds)
    # (settings, problem) -> (choice with its "val_top1", every candidate tried, payload of the chosen head fitted
    # on the fit rows); the search on val.
    select: Callable[[Any, Problem], tuple[dict, list, dict]]
    # (settings, choice, features, labels, num_classes, seed) -> (choice with the refit's own flags, payload).
    refit: Callable[..., tuple[dict, dict]]
    save: Callable[[Path, dict], None]  # (temporary path, payload) -> None; the stage makes the write atomic
    load: Callable[[Path], dict]  # (path checked intact) -> payload
    probabilities: Callable[[dict], Callable[[numpy.ndarray], numpy.ndarray]]  # features -> [N, classes]
    finite: Callable[[dict], bool]  # whether every fitted value is finite
    remedy: str  # what to change when a fitted head is not finite
    # Whether select and refit ignore the seed: the same rows and settings give the same head, bit for bit,
    # whatever the seed (so its repeats over seeds on the same rows have zero spread and need one fit).
    deterministic: bool
    # features -> predicted class per row; None: the first class with the highest probability.
    predict: Callable[[dict], Callable[[numpy.ndarray], numpy.ndarray]] | None = None

    def predictor(self, payload: dict) -> Callable[[numpy.ndarray], numpy.ndarray]:
        """Cached features -> predicted class per row, from a payload."""
        if self.predict is not None:
            return self.predict(payload)
        probabilities = self.probabilities(payload)
        return lambda features: probabilities(features).argmax(axis=1)


_REGISTRY: dict[str, HeadKind] = {}


def register_head_kind(kind: HeadKind) -> HeadKind:
    """Add a head kind; its name and its file name must both be new."""
    if kind.name in _REGISTRY:
        raise HeadError(f"head kind {kind.name!r} is already registered")
    clash = next((other.name for other in _REGISTRY.values() if other.file_name == kind.file_name), None)
    if clash is not None:
        raise HeadError(f"head kind {kind.name!r}: file name {kind.file_name!r} is already used by {clash!r}")
    if "_" in kind.name or "." in kind.name:
        # `<kind>_<key>` names a kind's setting in unit keys, `heads.<kind>.<key>` in overrides.
        raise HeadError(f"head kind {kind.name!r}: names may not contain '_' or '.'")
    _REGISTRY[kind.name] = kind
    return kind


def get_head_kind(name: str) -> HeadKind:
    """The kind registered under `name`; the error lists every valid name."""
    if name not in _REGISTRY:
        raise HeadError(f"unknown head kind {name!r}; valid kinds: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def available_head_kinds() -> tuple[str, ...]:
    """Registered kind names, in registration order."""
    return tuple(_REGISTRY)


def deterministic_kinds(names) -> list[str]:
    """Those of `names` that are registered kinds flagged deterministic, in registration order."""
    return [name for name in _REGISTRY if name in set(names) and _REGISTRY[name].deterministic]


def settings_tables() -> dict[str, type]:
    """{kind: its settings dataclass}: the `[heads.<kind>]` tables a config may hold."""
    return {name: kind.settings for name, kind in _REGISTRY.items()}


def default_tables() -> dict:
    """{kind: its settings with every default}, for a config that gives no table."""
    return {name: kind.settings() for name, kind in _REGISTRY.items()}


def saved_kind(directory: str | Path) -> HeadKind:
    """The kind whose head file is in a heads unit's folder."""
    directory = Path(directory)
    for kind in _REGISTRY.values():
        if (directory / kind.file_name).is_file():
            return kind
    names = ", ".join(kind.file_name for kind in _REGISTRY.values())
    raise FileNotFoundError(f"no head file ({names}) in {directory}; run `make heads` first")


# --- the registered kinds, in the order configs and docs list them ------------------------------------
# Below the registry: each kind module imports HeadKind and Problem from this package.

from . import knn, logistic, softmax  # noqa: E402

register_head_kind(softmax.KIND)
register_head_kind(logistic.KIND)
register_head_kind(knn.KIND)
