"""Subsets of the study's images, spread over each split (so over the classes) without an RNG."""

from __future__ import annotations

import numpy

from ..data import DatasetIndex


def evenly_spaced(count: int, wanted: int) -> numpy.ndarray:
    """`wanted` positions spread over 0..count-1 (the whole range when wanted >= count); no RNG involved."""
    if wanted >= count:
        return numpy.arange(count)
    return numpy.unique(numpy.linspace(0, count - 1, wanted).round().astype(numpy.int64))


def subset_index(index: DatasetIndex, counts: dict) -> DatasetIndex:
    """The index with `counts[split]` images of each split, spread over the split (so over the classes)."""
    picks = {split: evenly_spaced(len(ids), counts.get(split, len(ids))) for split, ids in index.image_ids.items()}
    return DatasetIndex(
        folder=index.folder,
        class_names=index.class_names,
        image_ids={split: index.image_ids[split][pick] for split, pick in picks.items()},
        labels={split: index.labels[split][pick] for split, pick in picks.items()},
        skipped=index.skipped,
    )


def proportional_counts(index: DatasetIndex, wanted: int) -> dict:
    """About `wanted` images in all, split like the dataset (at least one per split)."""
    sizes = {split: len(ids) for split, ids in index.image_ids.items()}
    total = sum(sizes.values())
    return {split: min(size, max(1, round(wanted * size / total))) for split, size in sizes.items()}
