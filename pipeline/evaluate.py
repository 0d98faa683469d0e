"""Test metrics and the files every arm writes: its result record (pipeline/results.py holds its schema)
and its per-image test predictions (what the report's intervals and paired comparisons read).

`finish_arm` ends every end-to-end unit: it tests the weights `train.fit` selected on val and writes
them, their history, the result record and the predictions.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
from torch import nn

from . import atomic, cache, checkpoints, distributed, train
from .graph import BuildContext, BuildResult
from .images import ImageSet
from .results import RESULT, check_result
from .runtime import Runtime, environment
from .train import FitResult

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
    atomic.write_bytes_atomic(Path(directory) / PREDICTIONS, buffer.getvalue())


def read_predictions(directory: Path) -> Predictions | None:
    """The unit's predictions, verified against its manifest; None when the unit has none (an arm built
    before predictions were saved). A damaged or torn file raises integrity.DamagedArtifact or ValueError."""
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
    atomic.write_json_atomic(Path(directory) / RESULT, record)


def finish_arm(
    context: BuildContext,
    model: nn.Module,
    result: FitResult,
    test_set: ImageSet,
    runtime: Runtime,
    record: dict,
    timings: dict,
    *,
    test_image_ids,
) -> BuildResult:
    """Test the best-on-val weights, write model.pt, history, result.json and the test predictions (by
    `test_image_ids`, in test_set's order), drop the resume checkpoint.

    `record` holds the arm's own fields (arm, method, backbone, head, input_size, selected...);
    the test metrics, times and history are added here.
    """
    model.load_state_dict(result.best_state)
    runtime.synchronize()
    started = time.perf_counter()
    logits = train.predict(model, test_set.to(runtime.device), runtime, result.eval_batch_size)
    runtime.synchronize()
    eval_seconds = time.perf_counter() - started
    class_names = list(record.pop("class_names"))
    predicted = logits.argmax(1).cpu().numpy()
    metrics = classification_metrics(test_set.labels.numpy(), predicted, len(class_names))
    directory = context.directory
    if distributed.is_main():
        checkpoints.write_model(directory / checkpoints.MODEL, result.best_state)
        checkpoints.write_history(directory, result.history)
    train_seconds = result.train_seconds + timings.get("probe_seconds", 0.0)
    images_trained = sum(row["images_per_second"] * row["train_seconds"] for row in result.history)
    full = {
        **record,
        "fit_on": "train",
        "seed": runtime.seed,
        "device": runtime.device,
        "precision": runtime.precision,
        "test_top1": metrics["top1"],
        "test_mean_per_class": metrics["mean_per_class"],
        "val_top1": result.best_val_top1,
        "train_seconds": train_seconds,
        "extract_seconds": 0.0,
        "eval_seconds": eval_seconds,
        "total_seconds": train_seconds + eval_seconds + timings.get("data_seconds", 0.0),
        "images_per_second": images_trained / max(1e-9, sum(row["train_seconds"] for row in result.history)),
        "eval_images_per_second": len(test_set) / eval_seconds,
        "per_class_accuracy": metrics["per_class_accuracy"],
        "confusion_matrix": metrics["confusion_matrix"],
        "class_names": class_names,
        "history": result.history,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "timings": {**timings, "train_seconds": train_seconds, "eval_seconds": eval_seconds},
        "world_size": distributed.world_size(),
    }
    if distributed.is_main():
        write_result(directory, full, labels=test_set.labels.numpy(), predictions=predicted, image_ids=test_image_ids)
    context.log(
        f"[{record['arm']}] test top-1 {metrics['top1']:.4f}, mean per-class {metrics['mean_per_class']:.4f} "
        f"(best val {result.best_val_top1:.4f} at epoch {result.best_epoch}/{result.epochs_run}); "
        f"train {train_seconds:.0f} s, test {eval_seconds:.0f} s"
    )
    return BuildResult(
        files=[RESULT, PREDICTIONS, checkpoints.HISTORY_JSON, checkpoints.HISTORY_CSV, checkpoints.MODEL],
        metrics={
            "test_top1": metrics["top1"],
            "test_mean_per_class": metrics["mean_per_class"],
            "val_top1": result.best_val_top1,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
        },
        timings={**timings, "train_seconds": train_seconds, "eval_seconds": eval_seconds},
        environment=environment(runtime),
        # The checkpoint only resumes this build; keeping it would let a forced rebuild
        # "resume" a finished run. The runner drops it after the manifest is written.
        discard_after_manifest=[checkpoints.CHECKPOINT],
    )
