"""The demo's procedural dataset: deterministic, a valid Flowers-102 layout for configs/demo.toml, and
classes that differ in shape far more than in overall colour."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest

from pipeline import data, demo_data
from pipeline.config import load_config

PROJECT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = PROJECT / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The dataset configs/demo.toml asks for, generated once for this module."""
    config = load_config(DEMO_CONFIG)
    return demo_data.ensure(tmp_path_factory.mktemp("demo"), demo_data.spec_for(config.data), log=lambda line: None)


def test_the_demo_config_keeps_to_its_own_cache_root_and_generated_data():
    config = load_config(DEMO_CONFIG)
    assert Path(config.cache.root) == Path("cache/demo")
    assert Path(config.data.root).parts[:2] == ("cache", "demo") and not config.data.download
    assert demo_data.spec_for(config.data) == demo_data.DemoSpec()
    assert set(config.features.backbones) | set(config.finetune.backbones) == {"efficientnet-lite0"}


def test_generation_is_deterministic(tmp_path):
    spec = demo_data.DemoSpec(per_class=(2, 1, 1), pixels=32, seed=3)
    first = demo_data.ensure(tmp_path / "a", spec, log=lambda line: None) / data.FOLDER
    second = demo_data.ensure(tmp_path / "b", spec, log=lambda line: None) / data.FOLDER
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len(files) == spec.total + 4  # images, the two .mat files, classnames.txt, demo.json
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Same download-stage fingerprint, so regenerated data keeps every cached stage valid.
    assert data.fingerprint(first) == data.fingerprint(second)
    other = (
        demo_data.ensure(
            tmp_path / "c", demo_data.DemoSpec(per_class=(2, 1, 1), pixels=32, seed=4), log=lambda line: None
        )
        / data.FOLDER
    )
    assert data.fingerprint(other) != data.fingerprint(first)


def test_existing_data_is_kept_regenerated_when_damaged_and_foreign_data_never_replaced(tmp_path):
    spec = demo_data.DemoSpec(num_classes=3, per_class=(1, 1, 1), pixels=24)
    lines = []
    demo_data.ensure(tmp_path, spec, log=lines.append)
    image = data.image_path(tmp_path / data.FOLDER, 1)
    written = image.stat().st_mtime_ns
    demo_data.ensure(tmp_path, spec, log=lines.append)
    assert "cached" in lines[-1] and image.stat().st_mtime_ns == written
    image.unlink()
    demo_data.ensure(tmp_path, spec, log=lines.append)
    assert "damaged" in lines[-2] and "writing" in lines[-1] and image.is_file()
    foreign = tmp_path / "foreign"
    (foreign / data.FOLDER / "jpg").mkdir(parents=True)
    with pytest.raises(demo_data.DemoDataError, match="not made by the demo generator"):
        demo_data.ensure(foreign, spec)
    assert not list((foreign / data.FOLDER / "jpg").iterdir())


def test_split_sizes_must_divide_by_class():
    config = load_config(DEMO_CONFIG, ["data.expected_split_sizes=[80, 81, 160]", "data.expected_images=321"])
    with pytest.raises(demo_data.DemoDataError, match="multiples of num_classes"):
        demo_data.spec_for(config.data)


def test_the_layout_verifies_under_the_demo_config(demo_root):
    config = load_config(DEMO_CONFIG)
    index = data.verify(data.dataset_folder(demo_root), config.data)
    assert {split: len(ids) for split, ids in index.image_ids.items()} == {"train": 80, "val": 80, "test": 160}
    assert index.class_names == list(demo_data.CLASSES)
    for split in data.SPLITS:
        assert numpy.bincount(index.labels[split], minlength=8).tolist() == [len(index.labels[split]) // 8] * 8
    # Image ids are shuffled across classes, as in the official set.
    assert not numpy.all(numpy.diff(index.labels["train"]) >= 0)


def _load(index, split, factor=4):
    """Images of a split, box-downscaled by `factor`, as float arrays."""
    from PIL import Image

    images = numpy.stack([numpy.asarray(Image.open(path), dtype=numpy.float64) for path in index.paths(split)])
    side = images.shape[1] // factor
    images = images[:, : side * factor, : side * factor]
    return images.reshape(len(images), side, factor, side, factor, 3).mean((2, 4)), index.labels[split]


def _shape_features(images):
    """Translation- and rotation-invariant shape descriptors, blind to colour: the radial power spectrum of
    the edge map, and the rotation-invariant harmonics of its edge-orientation histogram."""
    gray = images.mean(-1)
    gradient_y, gradient_x = numpy.gradient(gray, axis=(1, 2))
    edges = numpy.hypot(gradient_x, gradient_y)
    side = gray.shape[1]
    power = numpy.abs(numpy.fft.fftshift(numpy.fft.fft2(edges), axes=(1, 2))) ** 2
    rows, columns = numpy.mgrid[:side, :side] - side // 2
    rings = numpy.minimum(numpy.hypot(rows, columns).astype(int), side // 2 - 1).ravel()
    counts = numpy.bincount(rings, minlength=side // 2)
    radial = numpy.log(numpy.stack([numpy.bincount(rings, p.ravel(), side // 2) / counts for p in power]) + 1e-9)
    angle_bins = ((numpy.arctan2(gradient_y, gradient_x) + numpy.pi) / (2 * numpy.pi) * 36).astype(int) % 36
    histogram = numpy.stack(
        [numpy.bincount(b.ravel(), m.ravel() ** 2, 36) for b, m in zip(angle_bins, edges, strict=True)]
    )
    harmonics = numpy.abs(numpy.fft.rfft(histogram / histogram.sum(1, keepdims=True), axis=1))[:, 1:10]
    return numpy.concatenate([radial - radial.mean(1, keepdims=True), harmonics], 1)


def _nearest_centroid_accuracy(train, test, classes):
    (train_x, train_y), (test_x, test_y) = train, test
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-9
    train_x, test_x = (train_x - mean) / scale, (test_x - mean) / scale
    centroids = numpy.stack([train_x[train_y == label].mean(0) for label in range(classes)])
    predictions = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float(numpy.mean(predictions == test_y))


def test_classes_differ_in_shape_more_than_in_overall_colour(demo_root):
    index = data.verify(data.dataset_folder(demo_root), demo_data.data_settings(demo_data.DemoSpec()))
    (train_images, train_y), (test_images, test_y) = _load(index, "train"), _load(index, "test")
    chance = 1 / len(demo_data.CLASSES)
    # Measured 0.54 (chance 0.125): train on 10 images per class, test on 20.
    shape = _nearest_centroid_accuracy(
        (_shape_features(train_images), train_y), (_shape_features(test_images), test_y), len(demo_data.CLASSES)
    )
    assert shape > 3.5 * chance
    # Measured 0.17: the figure's hue is only a hint, and the muted background dominates an image's mean colour.
    colour = _nearest_centroid_accuracy(
        (train_images.mean((1, 2)), train_y), (test_images.mean((1, 2)), test_y), len(demo_data.CLASSES)
    )
    assert colour < 3 * chance and colour < shape / 2


def test_a_class_names_file_must_name_every_class(tmp_path):
    spec = demo_data.DemoSpec(num_classes=3, per_class=(1, 1, 1), pixels=24)
    folder = demo_data.ensure(tmp_path, spec, log=lambda line: None) / data.FOLDER
    before = data.fingerprint(folder)
    (folder / data.CLASS_NAMES_FILE).write_text("disc\nring\n")
    assert data.fingerprint(folder) != before  # renamed classes rebuild the download stage
    with pytest.raises(data.DataError, match="lists 2 class names, expected 3"):
        data.verify(folder, demo_data.data_settings(spec))
    (folder / data.CLASS_NAMES_FILE).unlink()
    assert data.verify(folder, demo_data.data_settings(spec)).class_names == ["class 0", "class 1", "class 2"]
