"""The features stage: pooled penultimate features of every split, once per frozen backbone.

One unit per backbone in [features] backbones, keyed by the backbone, its resolved input size and
preprocessing, the sha256 of its weights file ("random-init" for test-only backbones), the number
of augmented views (with their recipe and seed), and the precision and engine actually used (bf16
changes the numbers; onnxruntime moves their rounding). The HDF5 layout is documented in pipeline/features_h5.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import backbones, data, distributed, extract, features_h5, frozen, onnx_engine
from ..cache import compute_key
from ..calibration import features_workload
from ..config import Config
from ..features_h5 import FEATURES_FILE
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage
from ..runtime import Timings, environment, plan_runtime, resolve_runtime, seed_everything

CODE_VERSION = "2"  # 2: geometry resampled on uint8 tensors (extract.uint8_transform)


def unit_settings(config: Config, source: dict, precision: str, engine: str = "torch") -> dict:
    """Everything that changes the extracted numbers (and nothing that does not, like batch size)."""
    settings = {
        name: source[name]
        for name in ("backbone", "input_size", "resize_size", "preprocessing", "weights_id", "weights_sha256")
    }
    settings.update(precision=precision, augmented_views=config.features.augmented_views)
    if config.features.fold_batchnorm:
        settings.update(fold_batchnorm=True)  # absent when off, so earlier keys stay valid
    if engine != "torch":
        settings.update(engine=engine)  # absent for torch, so earlier keys stay valid
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
                config, frozen.resolve_source(config, name), *_choice(config, name, graph.cache_root)
            ),
            inputs=(("download", download),),
        )
        for name in config.features.backbones
    ]


def _choice(config: Config, name: str, cache_root: Path) -> tuple[str, str]:
    """(precision, engine) extraction of `name` runs in here: this machine's calibration where auto."""
    runtime = plan_runtime(config.runtime, features_workload(config, name, cache_root))
    return runtime.precision, runtime.engine


def build(context: BuildContext) -> BuildResult:
    config, name = context.config, context.unit.name
    index = data.load_index(context.input_directory("download"))
    runtime = resolve_runtime(config.runtime, features_workload(config, name, context.cache_root))
    seed_everything(runtime.seed)
    spec = backbones.get_backbone(name)
    timings = Timings(runtime)
    # Weight download and loading stay out of extraction time (they are recorded separately).
    with timings.phase("model_load"):
        source = frozen.resolve_source(config, name, allow_download=True)
        model = frozen.load_frozen_backbone(
            name,
            source["weights_path"],
            runtime.device,
            runtime.channels_last,
            config.features.fold_batchnorm,
            runtime.engine,
            source["input_size"],
        )
    jobs = frozen.extraction_jobs(index, config, spec, source["input_size"])
    settings = unit_settings(config, source, runtime.precision, runtime.engine)
    attributes = {
        "backbone": name,
        "weights_id": source["weights_id"],
        "weights_sha256": source["weights_sha256"],
        "weights_verified": source.get("weights_verified", "unknown"),
        "input_size": source["input_size"],
        "resize_size": source["resize_size"],
        "preprocessing": json.dumps(source["preprocessing"]),
        "precision": runtime.precision,
        "engine": runtime.engine,
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
    if runtime.engine == "onnxruntime":
        attributes["onnxruntime_version"] = onnx_engine.version()
    context.log(
        f"[features] {name}: {sum(len(job.paths) for job in jobs)} images at {source['input_size']} px, "
        f"{runtime.device} {runtime.precision}"
        + (f" in {runtime.engine}" if runtime.engine != "torch" else "")
        + f", weights {source['weights_id']}"
    )
    # A partial file is resumed only under equal settings and data (its rows would be the same numbers).
    key = compute_key("features", CODE_VERSION, settings, {"download": context.unit.input("download").key})
    options = frozen.extraction_options(config, context.log)
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
