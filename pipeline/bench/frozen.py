"""The frozen row: ours (extract + every head kind in [heads] kinds) against the notebook's frozen protocol."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy

from .. import backbones, evaluate, extract, features_h5, frozen, transforms
from ..calibration import features_workload
from ..config import Config
from ..data import DatasetIndex
from ..head_kinds import fitting, get_head_kind
from ..runtime import Runtime, plan_runtime, seed_everything
from .notebook import notebook_train_transform, time_notebook_frozen, train_notebook_head
from .options import BenchOptions
from .protocol import NOTEBOOK_EPOCHS, NOTEBOOK_GROUP, WARMUP_STEPS
from .rows import make_row, rows_of, weights_path
from .subsets import subset_index


def fit_our_heads(config: Config, path: Path, num_classes: int) -> dict:
    """Every head kind as the heads stage fits it (selection on val, optional refit), timed with loading; per kind."""
    seed_everything(config.runtime.seed)
    started = time.perf_counter()
    _, splits = fitting.load_splits(path, config.heads.use_augmented_views)
    load_seconds = time.perf_counter() - started
    results = {}
    for name in config.heads.kinds:
        kind = get_head_kind(name)
        started = time.perf_counter()
        chosen, _, payload = fitting.select(kind, config.heads, splits, num_classes, config.runtime.seed)
        if config.heads.fit_on == "train+val":
            rows = [numpy.concatenate([splits["fit"][part], splits["val"][part]]) for part in (0, 1)]
            chosen, payload = fitting.refit(kind, config.heads, chosen, *rows, num_classes, config.runtime.seed)
        predictions = kind.predictor(payload)(splits["test"][0])
        top1 = evaluate.classification_metrics(splits["test"][1], predictions, num_classes)["top1"]
        results[name] = {
            "val_top1": chosen["val_top1"],
            "test_top1": top1,
            "seconds": time.perf_counter() - started + load_seconds / len(config.heads.kinds),
        }
    return {"heads": results, "splits": splits}


def frozen_row(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> dict:
    """Row 3 on the first [features] backbone: ours (extract + every head kind) vs the notebook's frozen protocol."""
    name = config.features.backbones[0]
    # The precision the features stage uses for this backbone (calibrated where auto on CPU).
    runtime = plan_runtime(config.runtime, features_workload(config, name, Path(config.cache.root)))
    spec = backbones.get_backbone(name)
    _, input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    weights = weights_path(config, name)
    test_count = options.test_images or len(index.image_ids["test"])
    tested = subset_index(index, {"test": test_count})
    # The notebook is timed in two slices, one on each side of ours, as the extraction rows pair their
    # rounds, so a slowdown of the machine during ours weighs on both sides.
    timings_around = [
        time_notebook_frozen(name, weights, index, input_size, options.notebook_images, runtime, config.runtime.seed)
    ]
    # Ours: the features stage's jobs (every train/val image, augmented views, the test images) and every head kind.
    model = frozen.load_frozen_backbone(
        name, weights, runtime.device, runtime.channels_last, config.features.fold_batchnorm, runtime.engine, input_size
    )
    jobs = frozen.extraction_jobs(tested, config, spec, input_size)
    extracting = frozen.extraction_options(config, log, progress=False)
    log(f"[bench] frozen: extracting {rows_of(jobs)} rows with {name} (ours)")
    path = work / f"frozen-{name}.h5"
    timings = extract.write_features(path, "bench", jobs, model, spec.feature_dim, runtime, extracting)
    full_test = len(index.image_ids["test"])
    # With a test subset, our test extraction is scaled to the whole split so both sides cover the full study.
    extract_seconds = sum(
        record["seconds"] * (full_test / record["images"] if group == "test" else 1.0)
        for group, record in timings.items()
    )
    num_classes = len(index.class_names)
    ours = fit_our_heads(config, path, num_classes)
    ours_seconds = extract_seconds + sum(result["seconds"] for result in ours["heads"].values())
    chosen_kind = max(ours["heads"], key=lambda kind: ours["heads"][kind]["val_top1"])
    # The notebook's accuracy: its head recipe on cached features of its own augmented views.
    count = len(index.image_ids["train"])
    views_job = extract.Job(
        group=NOTEBOOK_GROUP,
        paths=index.paths("train") * options.notebook_views,
        labels=numpy.tile(index.labels["train"], options.notebook_views),
        image_ids=numpy.tile(index.image_ids["train"], options.notebook_views),
        views=numpy.repeat(numpy.arange(1, options.notebook_views + 1), count),
        transform=notebook_train_transform(spec, input_size),
        seed=config.runtime.seed,
    )
    log(f"[bench] frozen: extracting {options.notebook_views} notebook-style views of {count} train images")
    views_path = work / f"notebook-{name}.h5"
    extract.write_features(views_path, "bench-notebook", [views_job], model, spec.feature_dim, runtime, extracting)
    del model
    views = features_h5.read_group(views_path, NOTEBOOK_GROUP)["features"].reshape(options.notebook_views, count, -1)
    splits = ours["splits"]
    notebook = train_notebook_head(
        views, index.labels["train"], splits["val"], splits["test"], num_classes, config.runtime.seed
    )
    # The notebook's time: its protocol run for real on a few images, extrapolated to 25 epochs of train + val
    # and one test pass.
    timings_around.append(
        time_notebook_frozen(name, weights, index, input_size, options.notebook_images, runtime, config.runtime.seed)
    )
    timing = {
        key: (
            sum(part[key] for part in timings_around) / len(timings_around)
            if key.endswith("per_image")
            else sum(part[key] for part in timings_around)
        )
        for key in timings_around[0]
    }
    slice_seconds = " / ".join(
        f"{part['train_seconds_per_image'] + part['val_seconds_per_image']:.4f}" for part in timings_around
    )
    sizes = {split: len(index.image_ids[split]) for split in ("train", "val")}
    training_seconds = NOTEBOOK_EPOCHS * sum(sizes[split] * timing[f"{split}_seconds_per_image"] for split in sizes)
    # Its one test pass, at its val loop's speed per image: the test top-1 this row compares needs that
    # pass, as ours needs its test extraction, which is counted.
    test_seconds = full_test * timing["val_seconds_per_image"]
    notebook_seconds = training_seconds + test_seconds
    head_text = ", ".join(
        f"{kind} val {result['val_top1']:.3f} test {result['test_top1']:.3f}" for kind, result in ours["heads"].items()
    )
    notes = (
        f"{name}, {input_size} px. Ours: extract.write_features of {rows_of(jobs)} rows (train, val, "
        f"{config.features.augmented_views} augmented views, {test_count} test images"
        + (f", test time scaled to all {full_test}" if test_count < full_test else "")
        + f") + the heads in [heads] kinds ({head_text}); ours = the {chosen_kind} head (best val). "
        f"Notebook time: its protocol (fp32, batch 4, JPEG + RandomResizedCrop/flip for train, "
        f"resize/centre-crop for val, SGD head) run on "
        f"{timing['train_images_timed']} train + {timing['val_images_timed']} val images in two slices, before "
        f"and after ours ({WARMUP_STEPS} warm-up batches of each not counted; seconds per image "
        f"{slice_seconds} for train + val, averaged), extrapolated to {NOTEBOOK_EPOCHS} epochs x "
        f"({sizes['train']} train + {sizes['val']} val) = {training_seconds:.0f} s, plus one pass over the "
        f"{full_test} test images at its val speed = {test_seconds:.0f} s (without that pass, ours would be "
        f"{training_seconds / ours_seconds:.1f}x faster). Notebook accuracy APPROXIMATED: "
        f"its head recipe (SGD 0.001 "
        f"momentum 0.9, batch 4, StepLR 7/0.1, {NOTEBOOK_EPOCHS} epochs, best val epoch {notebook['best_epoch']}) "
        f"on cached {runtime.precision} eval-mode features of {options.notebook_views} notebook-style augmented "
        f"views per train image, cycled over the epochs; both accuracies on the same {test_count} test images."
    )
    log(
        f"[bench] frozen: ours {ours_seconds:.0f} s test {ours['heads'][chosen_kind]['test_top1']:.3f}; notebook "
        f"~{notebook_seconds:.0f} s test {notebook['test_top1']:.3f}"
    )
    return make_row(
        "frozen",
        f"frozen arm ({name}): extract + heads vs notebook protocol",
        ours_seconds,
        notebook_seconds,
        "s",
        ">= 15x faster (ratio <= 0.0667) at equal or better test top-1",
        [("ratio", "<=", 1 / 15), ("ours_test_top1", ">=", "baseline_test_top1")],
        notes,
        ours_test_top1=ours["heads"][chosen_kind]["test_top1"],
        baseline_test_top1=notebook["test_top1"],
        baseline_val_top1=notebook["val_top1"],
        test_images=test_count,
        ours_heads=ours["heads"],
        ours_extract_seconds=extract_seconds,
        backbone=name,
        ours_extract_rate=rows_of(jobs) / sum(record["seconds"] for record in timings.values()),
        notebook_timing=timing,
        notebook_timing_slices=timings_around,
        notebook_training_seconds=training_seconds,
        notebook_test_seconds=test_seconds,
        speedup=notebook_seconds / ours_seconds,
    )
