"""Test metrics and the writing of the one result record every arm writes (pipeline/results.py holds its schema)."""

from __future__ import annotations

from pathlib import Path

import numpy

from . import cache
from .results import RESULT, check_result


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


def write_result(directory: Path, record: dict) -> None:
    """Validate and atomically write an arm's result.json."""
    check_result(record)
    cache.write_json_atomic(Path(directory) / RESULT, record)
