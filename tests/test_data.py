"""Dataset verification accepts a correct layout and names what is wrong with a broken one."""

import shutil

import numpy
import pytest
from scipy.io import loadmat, savemat

from pipeline import data
from pipeline.config import DataConfig

FAKE = DataConfig(check_md5=False, num_classes=6, expected_images=84, expected_split_sizes=[24, 24, 36])


def test_fake_dataset_verifies_with_official_split_semantics(fake_flowers):
    index = data.verify(data.dataset_folder(fake_flowers), FAKE)
    assert {split: len(ids) for split, ids in index.image_ids.items()} == {"train": 24, "val": 24, "test": 36}
    for split in data.SPLITS:
        assert index.labels[split].min() == 0 and index.labels[split].max() == 5
        assert all(path.is_file() for path in index.paths(split))
    assert index.class_names == [f"class {number}" for number in range(6)]
    again = data.DatasetIndex.from_json(index.to_json())
    assert numpy.array_equal(again.labels["test"], index.labels["test"])


def test_both_root_forms_are_accepted(fake_flowers):
    assert data.dataset_folder(fake_flowers) == data.dataset_folder(fake_flowers / "flowers-102")


def test_real_class_names_come_from_torchvision():
    names = data.class_names(102)
    assert len(names) == 102 and names[0] == "pink primrose"


def _folder(root):
    return data.dataset_folder(root)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda folder: (folder / "setid.mat").unlink(), "setid.mat is missing"),
        (lambda folder: (folder / "imagelabels.mat").unlink(), "imagelabels.mat is missing"),
        (lambda folder: shutil.rmtree(folder / "jpg"), "jpg is missing"),
        (lambda folder: (folder / "jpg" / "image_00007.jpg").unlink(), "holds 83 images, expected 84"),
        (lambda folder: (folder / "setid.mat").write_bytes(b"not a mat file"), "cannot be read as a MATLAB file"),
    ],
)
def test_broken_layouts_are_rejected_with_the_file_named(fake_flowers, damage, fragment):
    folder = _folder(fake_flowers)
    damage(folder)
    with pytest.raises(data.DataError) as caught:
        data.verify(folder, FAKE)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_wrong_counts_and_labels_are_rejected(fake_flowers):
    folder = _folder(fake_flowers)
    with pytest.raises(data.DataError, match="split train has 24 images, expected 20"):
        data.verify(
            folder, DataConfig(check_md5=False, num_classes=6, expected_images=84, expected_split_sizes=[20, 24, 36])
        )
    with pytest.raises(data.DataError, match="expected 1..5"):
        data.verify(
            folder, DataConfig(check_md5=False, num_classes=5, expected_images=84, expected_split_sizes=[24, 24, 36])
        )
    with pytest.raises(data.DataError, match="official"):
        data.verify(
            folder, DataConfig(check_md5=True, num_classes=6, expected_images=84, expected_split_sizes=[24, 24, 36])
        )


def test_image_missing_from_a_split_is_named(fake_flowers):
    folder = _folder(fake_flowers)
    split = loadmat(folder / "setid.mat", squeeze_me=True)
    victim = int(split["tstid"][0])
    (folder / "jpg" / f"image_{victim:05d}.jpg").rename(folder / "jpg" / "image_99999.jpg")
    with pytest.raises(data.DataError, match=f"image_{victim:05d}.jpg"):
        data.verify(folder, FAKE)


def test_overlapping_splits_are_rejected(fake_flowers):
    folder = _folder(fake_flowers)
    split = loadmat(folder / "setid.mat", squeeze_me=True)
    split["valid"][0] = split["trnid"][0]
    savemat(folder / "setid.mat", {key: split[key] for key in ("trnid", "valid", "tstid")})
    with pytest.raises(data.DataError, match="more than one split"):
        data.verify(folder, FAKE)


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "flowers.zip"
    path.write_bytes(b"zip")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        data.verify(path, FAKE)


def test_offline_download_error_names_url_layout_and_data_dir(tmp_path):
    with pytest.raises(data.DataError) as caught:
        data.download(tmp_path / "empty")
    message = str(caught.value)
    assert "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/" in message
    assert "imagelabels.mat" in message and "DATA_DIR=" in message
    assert "\n" not in message


def test_fingerprint_tracks_content(fake_flowers):
    folder = _folder(fake_flowers)
    before = data.fingerprint(folder)
    assert before == data.fingerprint(folder)
    (folder / "jpg" / "image_00001.jpg").write_bytes(b"x" * 10)
    assert data.fingerprint(folder) != before
    assert data.fingerprint(folder / "absent") == "absent"


def _truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


@pytest.mark.parametrize("damage", [_truncate, lambda path: path.write_bytes(b"\xff\xd8 not really a jpeg")])
def test_corrupt_image_is_named_or_skipped_when_allowed(fake_flowers, damage):
    folder = _folder(fake_flowers)
    victim = sorted((folder / "jpg").iterdir())[3]
    damage(victim)
    with pytest.raises(data.DataError) as caught:
        data.verify(folder, FAKE)
    assert victim.name in str(caught.value) and "skip_bad_images" in str(caught.value)
    lenient = DataConfig(
        check_md5=False, num_classes=6, expected_images=84, expected_split_sizes=[24, 24, 36], skip_bad_images=True
    )
    index = data.verify(folder, lenient)
    assert [name for name, _ in index.skipped] == [victim.name]
    assert sum(len(ids) for ids in index.image_ids.values()) == 83
    assert all(victim not in index.paths(split) for split in data.SPLITS)


def test_mat_files_with_wrong_shape_are_rejected(fake_flowers):
    folder = _folder(fake_flowers)
    labels = loadmat(folder / "imagelabels.mat")["labels"]
    savemat(folder / "imagelabels.mat", {"labels": labels.reshape(2, -1)})
    with pytest.raises(data.DataError, match=r"imagelabels.mat 'labels' has shape \(2, 42\)"):
        data.verify(folder, FAKE)


def test_split_ids_with_wrong_shape_are_rejected(fake_flowers):
    folder = _folder(fake_flowers)
    split = loadmat(folder / "setid.mat", squeeze_me=True)
    split["tstid"] = split["tstid"].reshape(6, 6)
    savemat(folder / "setid.mat", {key: split[key] for key in ("trnid", "valid", "tstid")})
    with pytest.raises(data.DataError, match=r"'tstid' has shape \(6, 6\)"):
        data.verify(folder, FAKE)
