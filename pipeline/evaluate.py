"""Test metrics and the files every arm writes: its result record (pipeline/results.py holds its schema)
and its per-image test predictions (what the report's intervals and paired comparisons read)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy

from . import cache
from .results import RESULT, check_result

PREDICTIONS = "predictions.npz"
# Compact: class numbers fit int16 (Flowers-102 has 102 classes) and image ids int32.
_DTYPES = {"image_ids": numpy.int32, "labels": numpy.int16, "predicted": numpy.int16}


def classification_metrics(labels, predictions, num_classes: int) -> dict:
    """top-1, mean per-class accuracy, per-class accuracy and the confusion matrix (rows = true class)."""
    labels = numpy.asarray(labels, dtype=numpy.int64)
    predictions = numpy.asarray(predictions, dtype=numpy.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    confusion = numpy.zeros((num_classes, num_classes), dtype=numpy.int64)
    numpy.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = numpy.divide(numpy.diag(confusion), support, out=numpy.full(num_classes, numpy.nan), where=support > 0)
    return {
        "top1": float(numpy.mean(labels == predictions)) if len(labels) else float("nan"),
        "mean_per_class": float(numpy.nanmean(per_class)) if numpy.any(support > 0) else float("nan"),
        "per_class_accuracy": [None if numpy.isnan(value) else float(value) for value in per_class],
        "confusion_matrix": confusion.tolist(),
    }


@dataclass(frozen=True)
class Predictions:
    """One run's test predictions, image by image: official image id, true class, predicted class."""

    image_ids: numpy.ndarray
    labels: numpy.ndarray
    predicted: numpy.ndarray

    @classmethod
    def of(cls, image_ids, labels, predicted) -> Predictions:
        """Checked and narrowed to the stored dtypes; ValueError on a shape or range the file cannot hold."""
        arrays = {"image_ids": image_ids, "labels": labels, "predicted": predicted}
        arrays = {name: numpy.asarray(value).ravel() for name, value in arrays.items()}
        if len({len(value) for value in arrays.values()}) != 1:
            sizes = ", ".join(f"{name} {len(value)}" for name, value in arrays.items())
            raise ValueError(f"test predictions need one image id, label and prediction per image; got {sizes}")
        for name, value in arrays.items():
            limits = numpy.iinfo(_DTYPES[name])
            if len(value) and (value.min() < 0 or value.max() > limits.max):
                raise ValueError(f"test {name} must lie in 0..{limits.max}; got {value.min()}..{value.max()}")
        if len(numpy.unique(arrays["image_ids"])) != len(arrays["image_ids"]):
            raise ValueError("test image ids repeat; each test image must be predicted once")
        return cls(**{name: value.astype(_DTYPES[name]) for name, value in arrays.items()})

    @property
    def correct(self) -> numpy.ndarray:
        return self.labels == self.predicted


def write_predictions(directory: Path, predictions: Predictions) -> None:
    """Atomically write predictions.npz (compressed; a few tens of kilobytes for 6,149 test images)."""
    buffer = io.BytesIO()
    numpy.savez_compressed(
        buffer, image_ids=predictions.image_ids, labels=predictions.labels, predicted=predictions.predicted
    )
    cache.write_bytes_atomic(Path(directory) / PREDICTIONS, buffer.getvalue())


def read_predictions(directory: Path) -> Predictions | None:
    """The unit's predictions, verified against its manifest; None when the unit has none (an arm built
    before predictions were saved). A damaged or torn file raises cache.DamagedArtifact or ValueError."""
    path = Path(directory) / PREDICTIONS
    manifest = cache.read_manifest(path.parent) or {}
    if PREDICTIONS not in manifest.get("files", []):
        return None
    with numpy.load(cache.require_intact(path)) as stored:
        return Predictions.of(stored["image_ids"], stored["labels"], stored["predicted"])


def write_result(directory: Path, record: dict, *, labels=None, predictions=None, image_ids=None) -> None:
    """Validate and atomically write an arm's result.json and, given the test labels, predicted classes
    and image ids, its predictions.npz (list PREDICTIONS among the unit's files then)."""
    check_result(record)
    given = [value is not None for value in (labels, predictions, image_ids)]
    if any(given) and not all(given):
        raise ValueError("write_result needs labels, predictions and image_ids together, or none of them")
    if all(given):
        stored = Predictions.of(image_ids, labels, predictions)
        top1 = record["test_top1"]
        if len(stored.labels) and top1 is not None and abs(float(numpy.mean(stored.correct)) - top1) > 1e-9:
            raise ValueError(f"the test predictions score {numpy.mean(stored.correct)}, the record test_top1 {top1}")
        write_predictions(directory, stored)
    cache.write_json_atomic(Path(directory) / RESULT, record)
