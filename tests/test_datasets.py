"""Every dataset kind besides Flowers-102: a folder tree with and without val, the torchvision kinds laid out
on disk as torchvision expects, their checks and one-line errors, and a whole study on a folder tree with a
torchvision backbone whose weights come from a file named in [weights]."""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from dataset_helpers import CLASSES, write_fake_aircraft, write_fake_dtd, write_fake_pet, write_folder_tree
from helpers import make_tiny_config

from pipeline import data, dataset_kinds, datasets, graph
from pipeline.config import DATASET_KINDS, DataConfig

ANY_SIZE = {"num_classes": 0, "expected_images": 0, "expected_split_sizes": [0, 0, 0], "download": False}


def settings(kind: str, **changes) -> DataConfig:
    return DataConfig(dataset=kind, **{**ANY_SIZE, **changes})


def test_every_configurable_kind_has_a_reader():
    assert set(DATASET_KINDS) == {datasets.FLOWERS, "folder", *dataset_kinds.TORCHVISION_KINDS}


def test_folder_with_val_keeps_its_splits_and_names_classes_by_folder(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 3, "val": 2, "test": 2}, classes=("b", "a", "c"))
    index = datasets.read(settings("folder"), root, seed=0)
    assert index.class_names == ["a", "b", "c"]  # sorted, whatever order the folders were made in
    assert {split: len(index.paths(split)) for split in data.SPLITS} == {"train": 9, "val": 6, "test": 6}
    assert all(path.parent.parent.name == split for split in data.SPLITS for path in index.paths(split))
    pairs = zip(index.paths("val"), index.labels["val"], strict=True)
    assert all(index.class_names[label] == path.parent.name for path, label in pairs)
    ids = numpy.concatenate([index.image_ids[split] for split in data.SPLITS])
    assert sorted(ids.tolist()) == list(range(1, 22))
    assert index.split_note == "the given train/val/test folders"
    assert data.DatasetIndex.from_json(json.loads(json.dumps(index.to_json()))).paths("test") == index.paths("test")


def test_val_is_carved_from_train_seeded_stratified_and_disjoint(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 10, "test": 2})
    first = datasets.read(settings("folder", val_fraction=0.2), root, seed=3)
    again = datasets.read(settings("folder", val_fraction=0.2), root, seed=3)
    other = datasets.read(settings("folder", val_fraction=0.2), root, seed=4)
    assert first.paths("val") == again.paths("val") and first.paths("val") != other.paths("val")
    assert numpy.bincount(first.labels["val"]).tolist() == [2] * len(CLASSES)  # 0.2 of 10, in every class
    assert numpy.bincount(first.labels["train"]).tolist() == [8] * len(CLASSES)
    assert not set(first.paths("val")) & set(first.paths("train"))
    assert "carved from train" in first.split_note and "0.2" in first.split_note


def test_a_class_with_one_train_image_cannot_give_val(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 1, "test": 1})
    with pytest.raises(data.DataError, match="needs at least 2 per class"):
        datasets.read(settings("folder"), root, seed=0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "test" / "apple").rename(root / "test" / "apricot"), "other classes than train"),
        (lambda root: [path.unlink() for path in (root / "val" / "birch").iterdir()], "holds no images"),
        (lambda root: (root / "test" / "cedar" / "cedar_test_000.jpg").write_bytes(b"not a jpeg"), "unreadable"),
        (lambda root: __import__("shutil").rmtree(root / "test"), "folder dataset not found"),
    ],
)
def test_folder_problems_are_one_line_errors(tmp_path, damage, message):
    root = write_folder_tree(tmp_path / "tree", {"train": 2, "val": 1, "test": 1})
    damage(root)
    with pytest.raises(data.DataError, match=message) as caught:
        datasets.read(settings("folder"), root, seed=0)
    assert "\n" not in str(caught.value)


def test_a_file_in_two_splits_is_refused(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 2, "val": 1, "test": 1})
    (root / "test" / "daisy" / "copy.jpg").symlink_to(root / "train" / "daisy" / "daisy_train_000.jpg")
    with pytest.raises(data.DataError, match="splits must be disjoint"):
        datasets.read(settings("folder"), root, seed=0)


def test_configured_counts_are_checked(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 2, "val": 1, "test": 1})
    with pytest.raises(data.DataError, match=r"has 4 classes, expected 5 \(\[data\] num_classes"):
        datasets.read(settings("folder", num_classes=5), root, seed=0)
    with pytest.raises(data.DataError, match=r"split val has 4 images, expected 3"):
        datasets.read(settings("folder", expected_split_sizes=[8, 3, 4]), root, seed=0)
    datasets.read(settings("folder", num_classes=4, expected_images=16, expected_split_sizes=[8, 4, 4]), root, seed=0)


def test_the_fingerprint_covers_every_image(tmp_path):
    root = write_folder_tree(tmp_path / "tree", {"train": 2, "test": 1})
    before = datasets.fingerprint(settings("folder"), root)
    assert datasets.fingerprint(settings("folder"), root) == before
    (root / "test" / "apple" / "apple_test_000.jpg").write_bytes(b"other bytes")
    assert datasets.fingerprint(settings("folder"), root) != before
    assert datasets.fingerprint(settings("folder"), tmp_path / "nowhere") == "absent"


TORCHVISION_FAKES = {
    "oxford_iiit_pet": (lambda root: write_fake_pet(root, {"trainval": 4, "test": 2}), (12, 4, 8), "carved"),
    "dtd": (lambda root: write_fake_dtd(root, 2), (8, 8, 8), "official"),
    "fgvc_aircraft": (lambda root: write_fake_aircraft(root, 2), (8, 8, 8), "official"),
}


@pytest.mark.parametrize("kind", sorted(TORCHVISION_FAKES))
def test_torchvision_kinds_read_their_own_layout(tmp_path, kind):
    write, sizes, origin = TORCHVISION_FAKES[kind]
    root = write(tmp_path / "root")
    index = datasets.read(settings(kind, val_fraction=0.25), root, seed=0)
    assert tuple(len(index.paths(split)) for split in data.SPLITS) == sizes
    assert len(index.class_names) == len(CLASSES) and all(path.is_file() for path in index.paths("test"))
    assert origin in index.split_note
    for split in data.SPLITS:
        assert numpy.bincount(index.labels[split]).tolist() == [sizes[data.SPLITS.index(split)] // 4] * 4
    assert datasets.fingerprint(settings(kind), root) not in ("absent", datasets.fingerprint(settings(kind), tmp_path))


@pytest.mark.parametrize("kind", sorted(TORCHVISION_FAKES))
def test_a_missing_torchvision_dataset_says_what_to_place_where(tmp_path, kind):
    with pytest.raises(data.DataError) as caught:
        datasets.read(settings(kind), tmp_path, seed=0)
    message = str(caught.value)
    spec = dataset_kinds.TORCHVISION_KINDS[kind]
    assert "\n" not in message and str(tmp_path / spec.folder) in message and spec.layout in message


@pytest.mark.slow
def test_a_folder_study_with_a_torchvision_backbone_from_a_weights_file(tmp_path):
    """The whole study on a folder tree (val carved, classes from the data) with torchvision:mobilenet_v3_small,
    whose (random) weights come from the file [weights] names."""
    from pipeline.backbones import build_backbone

    name = "torchvision:mobilenet_v3_small"
    weights = tmp_path / "mobilenet-mine.pth"
    torch.manual_seed(0)
    torch.save(build_backbone(name, pretrained=False).state_dict(), weights)
    root = write_folder_tree(tmp_path / "tree", {"train": 6, "test": 3})
    config = make_tiny_config(
        root,
        tmp_path / "cache",
        (
            'data.dataset="folder"',
            "data.num_classes=0",
            "data.expected_images=0",
            "data.expected_split_sizes=[0, 0, 0]",
            "data.val_fraction=0.34",
            f'features.backbones=["tiny-resnet", "{name}"]',
            f'finetune.backbones=["{name}"]',
            "finetune.epochs=1",
            "cnn.epochs=1",
            f'weights."{name}"="{weights}"',
            "runtime.threads=1",
        ),
    )
    study = graph.Graph(config, log=lambda line: None)
    study.validate(graph.stages())
    for stage in graph.stages():
        study.run(stage)
    summary = json.loads((study.directory(study.units("samples")[0]) / "sizes.json").read_text())
    assert summary["splits"] == {"train": 16, "val": 8, "test": 12} and summary["num_classes"] == 4
    assert "carved from train" in summary["split_note"]
    report = next(study.directory(study.units("report")[0]).glob("*.html")).read_text()
    assert "val carved from train" in report and name in report


def test_scratch_sizes_left_at_zero_follow_the_data(tmp_path, monkeypatch):
    from pipeline.stages import cnn
    from pipeline.training_settings import CnnConfig

    index = datasets.read(settings("folder"), write_folder_tree(tmp_path / "tree", {"train": 2, "test": 1}), seed=0)
    assert datasets.typical_side(index) == 32
    assert cnn.scratch_sizes(CnnConfig(input_size=0, stored_size=0), index) == (32, 32)  # thumbnails: as they are
    assert cnn.scratch_sizes(CnnConfig(input_size=48, stored_size=40), index) == (48, 40)  # set: kept
    monkeypatch.setattr(cnn, "typical_side", lambda index: 500)
    assert cnn.scratch_sizes(CnnConfig(input_size=0, stored_size=0), index) == (224, 256)  # large: ImageNet sizes
