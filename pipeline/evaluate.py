"""Test metrics and the writing of the one result record every arm writes (pipeline/results.py holds its schema).

`finish_arm` ends every end-to-end unit: it tests the weights `train.fit` selected on val and writes
them, their history and the result record.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy
from torch import nn

from . import cache, checkpoints, distributed, train
from .graph import BuildContext, BuildResult
from .images import ImageSet
from .results import RESULT, check_result
from .runtime import Runtime, environment
from .train import FitResult


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


def finish_arm(
    context: BuildContext,
    model: nn.Module,
    result: FitResult,
    test_set: ImageSet,
    runtime: Runtime,
    record: dict,
    timings: dict,
) -> BuildResult:
    """Test the best-on-val weights, write model.pt, history and result.json, drop the resume checkpoint.

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
    metrics = classification_metrics(test_set.labels.numpy(), logits.argmax(1).cpu().numpy(), len(class_names))
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
        write_result(directory, full)
    context.log(
        f"[{record['arm']}] test top-1 {metrics['top1']:.4f}, mean per-class {metrics['mean_per_class']:.4f} "
        f"(best val {result.best_val_top1:.4f} at epoch {result.best_epoch}/{result.epochs_run}); "
        f"train {train_seconds:.0f} s, test {eval_seconds:.0f} s"
    )
    return BuildResult(
        files=[RESULT, checkpoints.HISTORY_JSON, checkpoints.HISTORY_CSV, checkpoints.MODEL],
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
