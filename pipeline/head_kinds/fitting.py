"""Fitting and storing a head of any kind: the splits it is fitted on, the search on val, the refit,
the finiteness check, and the head file written and read back (the heads stage, the bench's frozen
row and `make predict` use these).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy

from .. import atomic, cache, features_h5
from ..config import HeadsConfig
from ..features_h5 import AUGMENTED_GROUP
from . import HeadError, HeadKind, Problem, saved_kind


def _rows(group: dict, rows) -> dict:
    return {name: values[rows] for name, values in group.items()}


def load_splits(path, use_augmented_views: bool, choose_train: Callable | None = None) -> tuple[dict, dict]:
    """(attributes, {train, fit, val, test} -> (features, labels)); fit = train plus its augmented views when used.

    `choose_train` (train labels -> sorted row indices) keeps only those training images, and of the
    augmented views only those of the kept images (matched by image id), as the label-efficiency curves ask.
    """
    attributes = features_h5.read_attributes(path)
    groups = {split: features_h5.read_group(path, split) for split in ("train", "val", "test")}
    if choose_train is not None:
        groups["train"] = _rows(groups["train"], choose_train(groups["train"]["labels"]))
    fit = [groups["train"]]
    if use_augmented_views and AUGMENTED_GROUP in attributes["groups"]:
        augmented = features_h5.read_group(path, AUGMENTED_GROUP)
        if choose_train is not None:
            augmented = _rows(augmented, numpy.isin(augmented["image_ids"], groups["train"]["image_ids"]))
        fit.append(augmented)
    splits = {name: (group["features"], group["labels"]) for name, group in groups.items()}
    splits["fit"] = (
        numpy.concatenate([group["features"] for group in fit]),
        numpy.concatenate([group["labels"] for group in fit]),
    )
    return attributes, splits


def select(kind: HeadKind, settings: HeadsConfig, splits: dict, num_classes: int, seed: int) -> tuple:
    """Hyper-parameter search on val: (choice, every candidate, payload of the chosen head fitted on the fit rows)."""
    problem = Problem(splits["fit"], splits["val"], num_classes, list(settings.normalizations), seed)
    return kind.select(settings.table(kind.name), problem)


def refit(
    kind: HeadKind, settings: HeadsConfig, chosen: dict, features, labels, num_classes: int, seed: int
) -> tuple[dict, dict]:
    """The chosen head fitted afresh on (features, labels): (choice with the refit's own flags, payload)."""
    return kind.refit(settings.table(kind.name), chosen, features, labels, num_classes, seed)


def require_finite(kind: HeadKind, payload: dict, name: str) -> None:
    """Stop with one line when a fitted head holds NaN or infinity: its test number would be meaningless."""
    if not kind.finite(payload):
        raise HeadError(
            f"the {name} head diverged (its fitted values are not finite); nothing was cached; {kind.remedy} and rerun"
        )


def save_head(directory, kind: HeadKind, payload: dict) -> str:
    """Write the fitted head atomically, in its kind's own format; returns the file name."""
    with atomic.atomic_path(Path(directory) / kind.file_name) as temporary:
        kind.save(temporary, payload)
    return kind.file_name


def saved_head(directory) -> tuple[HeadKind, dict]:
    """(kind, payload as saved) of the head in a heads unit's folder, its file checked intact first."""
    kind = saved_kind(directory)
    return kind, kind.load(cache.require_intact(Path(directory) / kind.file_name))


def load_head(directory) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """The head saved in a heads unit's folder, as a function from cached features to predicted classes."""
    kind, payload = saved_head(directory)
    return kind.predictor(payload)
