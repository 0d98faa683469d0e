"""Flowers-102 on disk: locate, download, verify, and index the official splits.

Layout (torchvision's `Flowers102`): `<root>/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}`.
`DATA_DIR` may point at `<root>` or at the `flowers-102` folder itself; it is only ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from .config import DataConfig
from .errors import PipelineError

SPLITS = ("train", "val", "test")
# setid.mat variable per split; note the official "trnid"/"valid"/"tstid" names.
SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
URL_PREFIX = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
OFFICIAL_MD5 = {"imagelabels.mat": "e0620be6f572b9609742df49c70aed4d", "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c"}
FOLDER = "flowers-102"
# Optional, one class name per line in label order (the demo dataset writes one); Flowers-102 has none.
CLASS_NAMES_FILE = "classnames.txt"
# The verified split index the download stage writes into its unit folder.
INDEX = "index.json"


class DataError(PipelineError, RuntimeError):
    """The dataset is missing or does not match what the config expects (one-line message)."""


def class_names(num_classes: int, folder: Path | None = None) -> list[str]:
    """The names in `folder`/classnames.txt when present, else the 102 English class names (torchvision's
    list), or generic names for other datasets."""
    listed = Path(folder) / CLASS_NAMES_FILE if folder is not None else None
    if listed is not None and listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise DataError(f"{listed} lists {len(names)} class names, expected {num_classes} ([data] num_classes)")
        return names
    if num_classes == 102:
        from torchvision.datasets import Flowers102

        return list(Flowers102.classes)
    return [f"class {index}" for index in range(num_classes)]


def dataset_folder(root: str | Path) -> Path:
    """The folder holding jpg/ and the .mat files, for a root given either way."""
    root = Path(root).expanduser()
    if (root / "jpg").is_dir() or (root / "setid.mat").exists():
        return root
    return root / FOLDER


def image_path(folder: Path, image_id: int) -> Path:
    return Path(folder) / "jpg" / f"image_{int(image_id):05d}.jpg"


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(folder: Path, names: list, memo_path: Path | None, write: bool) -> list[str]:
    """sha256 of each file, reusing a memo of earlier digests for files whose size, times and inode are unchanged."""
    from . import atomic, errors, integrity

    memo = {}
    if memo_path is not None:
        try:
            memo = json.loads(Path(memo_path).read_text())
        except (OSError, ValueError):
            memo = {}  # absent or torn: every file is hashed again
    fresh, digests = {}, []
    for name in names:
        path = folder / name
        try:
            status = os.stat(path)
        except FileNotFoundError:
            raise DataError(
                f"{path} is missing or a dangling link; replace it or point DATA_DIR at a complete copy"
            ) from None
        except OSError as error:
            raise DataError(
                f"cannot read {path} ({error.strerror or error}); make it readable or point DATA_DIR at a readable copy"
            ) from None
        stamp = [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]
        known = memo.get(name)
        if known is not None and known[:4] == stamp:
            digest = known[4]
        else:
            try:
                digest = integrity.file_digest(path)
            except OSError as error:
                raise DataError(
                    f"cannot read {path} ({error.strerror or error}); make it readable or point "
                    "DATA_DIR at a readable copy"
                ) from None
        fresh[name] = stamp + [digest]
        digests.append(digest)
    # An existing memo is refreshed even while planning: data copied or touched since the build would
    # otherwise be hashed whole on every warm run, the download unit staying cached on equal content.
    if memo_path is not None and fresh != memo and (write or memo):
        with contextlib.suppress(errors.CacheError):  # only a speed-up: the next run hashes again
            atomic.write_json_atomic(memo_path, fresh)
    return digests


def fingerprint(folder: Path, memo_path: Path | None = None, write_memo: bool = False) -> str:
    """Content fingerprint of the dataset: the sha256 of every image and label/split file.

    Part of the download stage's key, so other data behind the same DATA_DIR (even one replaced
    image) rebuilds everything downstream, while a rerun on the same data stays cached. Digests are
    memoised in `memo_path` by each file's size, times and inode, so a rerun only stats the files;
    the memo is created only with `write_memo` (by the download stage's build); planning refreshes
    one that exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "absent"
    listed = (*OFFICIAL_MD5, CLASS_NAMES_FILE)
    names = [name for name in listed if (folder / name).exists() or (folder / name).is_symlink()]
    images = folder / "jpg"
    if images.is_dir():
        try:
            with os.scandir(images) as entries:
                names += sorted(f"jpg/{entry.name}" for entry in entries if entry.name.endswith(".jpg"))
        except OSError as error:
            raise DataError(
                f"cannot list {images} ({error.strerror or error}); make it readable or point DATA_DIR "
                "at a readable copy"
            ) from None
    digests = _file_digests(folder, names, memo_path, write_memo)
    material = "\n".join(f"{name} {digest}" for name, digest in zip(names, digests, strict=True))
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def download(root: Path) -> None:
    """Fetch Flowers-102 through torchvision into `root` (needs internet)."""
    from torchvision.datasets import Flowers102

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            Flowers102(root=str(root), split=split, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError... all mean the same here
        raise DataError(
            f"could not download Flowers-102 from {URL_PREFIX} ({type(error).__name__}: {str(error)[:120]}); "
            f"place 102flowers.tgz's jpg/ folder with imagelabels.mat and setid.mat in {root / FOLDER}/ "
            "or pass DATA_DIR=<folder holding flowers-102/>"
        ) from None


def missing_message(folder: Path, what: str) -> str:
    return (
        f"Flowers-102 not found: {what}; expected {folder}/jpg/image_00001.jpg..., {folder}/imagelabels.mat "
        f"and {folder}/setid.mat (from {URL_PREFIX}); pass DATA_DIR=<folder holding flowers-102/> "
        "or enable [data] download with internet"
    )


@dataclass(frozen=True)
class DatasetIndex:
    folder: Path
    class_names: list
    image_ids: dict  # split -> numpy int array (1-based official ids)
    labels: dict  # split -> numpy int array (0-based)
    skipped: tuple = ()  # (file name, reason) of unreadable images dropped by [data] skip_bad_images
    # Other dataset kinds (pipeline.datasets): split -> file paths relative to `folder`, in id order.
    # None for Flowers-102, whose file names follow from the ids.
    files: dict | None = None
    split_note: str = "official splits"  # how the splits were made, as the report words it

    def paths(self, split: str) -> list[Path]:
        if self.files is not None:
            return [self.folder / name for name in self.files[split]]
        return [image_path(self.folder, image_id) for image_id in self.image_ids[split]]

    def to_json(self) -> dict:
        value = {
            "folder": str(self.folder),
            "class_names": self.class_names,
            "image_ids": {split: ids.tolist() for split, ids in self.image_ids.items()},
            "labels": {split: labels.tolist() for split, labels in self.labels.items()},
            "skipped": [list(item) for item in self.skipped],
        }
        if self.files is not None:  # absent for Flowers-102, so its index file keeps its bits
            value.update(files=self.files, split_note=self.split_note)
        return value

    @classmethod
    def from_json(cls, value: dict) -> DatasetIndex:
        return cls(
            folder=Path(value["folder"]),
            class_names=list(value["class_names"]),
            image_ids={split: numpy.asarray(ids, dtype=numpy.int64) for split, ids in value["image_ids"].items()},
            labels={split: numpy.asarray(labels, dtype=numpy.int64) for split, labels in value["labels"].items()},
            skipped=tuple(tuple(item) for item in value.get("skipped", [])),
            files=value.get("files"),
            split_note=value.get("split_note", "official splits"),
        )


def load_index(directory: Path) -> DatasetIndex:
    """The verified split index written by the download stage (what every other stage reads)."""
    return DatasetIndex.from_json(json.loads((Path(directory) / INDEX).read_text()))


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except OSError:
        raise  # permission or I/O: verify() names the file and the fix
    except Exception as error:  # scipy raises several types for a damaged file
        raise DataError(
            f"{path} cannot be read as a MATLAB file ({type(error).__name__}); "
            f"replace it with the official one from {URL_PREFIX}{path.name}"
        ) from None


def _integral(values: numpy.ndarray, what: str) -> numpy.ndarray:
    """`values` as int64, refusing anything that is not a finite whole number (truncation would relabel silently)."""
    try:
        as_float = values.astype(numpy.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} holds non-numeric values; use the official file") from None
    bad = ~numpy.isfinite(as_float) | (as_float != numpy.round(as_float))
    if bad.any():
        raise DataError(
            f"{what} holds {bad.sum()} value(s) that are not whole numbers, e.g. "
            f"{float(as_float[bad][0])!r} at position {int(numpy.flatnonzero(bad)[0])}; "
            "use the official file"
        )
    return as_float.astype(numpy.int64)


def unreadable_message(error: OSError, fallback: Path) -> str:
    """One line for a file-system error on the data: the path, the reason and the fix."""
    path = error.filename or fallback
    return (
        f"cannot read {path} ({error.strerror or error}); make it readable (or replace it) or point "
        "DATA_DIR at a readable copy"
    )


def verify(folder: Path, settings: DataConfig) -> DatasetIndex:
    """Check the dataset against the config and return its split index; DataError says what is wrong."""
    try:
        return _verify(Path(folder), settings)
    except OSError as error:  # permission denied, a dangling link, an I/O error: never a traceback
        raise DataError(unreadable_message(error, Path(folder))) from None


def _verify(folder: Path, settings: DataConfig) -> DatasetIndex:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; DATA_DIR must be the folder holding flowers-102/")
    for name in OFFICIAL_MD5:
        if not (folder / name).is_file():
            raise DataError(missing_message(folder, f"{folder / name} is missing"))
    if not (folder / "jpg").is_dir():
        raise DataError(missing_message(folder, f"{folder / 'jpg'} is missing"))
    if settings.check_md5:
        for name, expected in OFFICIAL_MD5.items():
            actual = md5_of(folder / name)
            if actual != expected:
                raise DataError(
                    f"{folder / name} has md5 {actual}, not the official {expected}; re-download it from "
                    f"{URL_PREFIX}{name} (or set [data] check_md5 = false for a custom split)"
                )
    labels_mat = _load_mat(folder / "imagelabels.mat")
    if "labels" not in labels_mat:
        raise DataError(f"{folder / 'imagelabels.mat'} has no 'labels' variable; use the official file")
    labels = numpy.atleast_1d(numpy.asarray(labels_mat["labels"]))
    if labels.ndim != 1:
        raise DataError(
            f"{folder / 'imagelabels.mat'} 'labels' has shape {labels.shape}, expected one row of "
            f"{settings.expected_images}; use the official file"
        )
    labels = _integral(labels, f"{folder / 'imagelabels.mat'} 'labels'")
    if len(labels) != settings.expected_images:
        raise DataError(
            f"{folder / 'imagelabels.mat'} lists {len(labels)} labels, expected {settings.expected_images} "
            "([data] expected_images)"
        )
    if labels.min() < 1 or labels.max() > settings.num_classes:
        raise DataError(
            f"{folder / 'imagelabels.mat'} has labels {labels.min()}..{labels.max()}, "
            f"expected 1..{settings.num_classes} ([data] num_classes)"
        )
    found = len(labels)
    image_names = {entry for entry in os.listdir(folder / "jpg") if entry.endswith(".jpg")}
    if len(image_names) != settings.expected_images:
        raise DataError(
            f"{folder / 'jpg'} holds {len(image_names)} images, expected {settings.expected_images}; "
            "re-extract 102flowers.tgz there"
        )
    split_mat = _load_mat(folder / "setid.mat")
    image_ids, split_labels, seen = {}, {}, set()
    for split, expected_size in zip(SPLITS, settings.expected_split_sizes, strict=True):
        key = SPLIT_KEYS[split]
        if key not in split_mat:
            raise DataError(f"{folder / 'setid.mat'} has no '{key}' variable; use the official file")
        ids = numpy.atleast_1d(numpy.asarray(split_mat[key]))
        if ids.ndim != 1:
            raise DataError(
                f"{folder / 'setid.mat'} '{key}' has shape {ids.shape}, expected one row of image ids; "
                "use the official file"
            )
        ids = _integral(ids, f"{folder / 'setid.mat'} '{key}'")
        if len(ids) != expected_size:
            raise DataError(
                f"{folder / 'setid.mat'} split {split} has {len(ids)} images, expected {expected_size} "
                "([data] expected_split_sizes)"
            )
        if ids.min() < 1 or ids.max() > found:
            raise DataError(f"{folder / 'setid.mat'} split {split} refers to image ids outside 1..{found}")
        unique, counts = numpy.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(
                f"{folder / 'setid.mat'} split {split} lists image {unique[counts > 1][0]} more than once; "
                "use the official file"
            )
        overlap = seen.intersection(ids.tolist())
        if overlap:
            raise DataError(f"{folder / 'setid.mat'}: image {min(overlap)} is in more than one split")
        seen.update(ids.tolist())
        missing = [image_id for image_id in ids if image_path(folder, image_id).name not in image_names]
        if missing:
            raise DataError(
                f"{len(missing)} images of split {split} are missing, e.g. "
                f"{image_path(folder, missing[0])}; re-extract 102flowers.tgz"
            )
        image_ids[split] = ids
        split_labels[split] = labels[ids - 1] - 1
    skipped = []
    if settings.check_images:
        bad = unreadable_images(folder, sorted(seen))
        if bad and not settings.skip_bad_images:
            image_id, reason = bad[0]
            raise DataError(
                f"{len(bad)} unreadable image(s), e.g. {image_path(folder, image_id)} ({reason}); replace "
                "them from 102flowers.tgz, or set [data] skip_bad_images = true to leave them out"
            )
        for split in SPLITS:
            keep = ~numpy.isin(image_ids[split], [image_id for image_id, _ in bad])
            image_ids[split], split_labels[split] = image_ids[split][keep], split_labels[split][keep]
        skipped = [(image_path(folder, image_id).name, reason) for image_id, reason in bad]
    return DatasetIndex(
        folder=folder.resolve(),
        class_names=class_names(settings.num_classes, folder),
        image_ids=image_ids,
        labels=split_labels,
        skipped=tuple(skipped),
    )


def unreadable_images(folder: Path, image_ids) -> list[tuple[int, str]]:
    """(id, reason) for every image that does not decode cleanly (pixels.decode_problem: corrupt-data
    warnings count as failures)."""
    from .pixels import decode_problem

    bad = []
    for image_id in image_ids:
        problem = decode_problem(image_path(folder, image_id))
        if problem is not None:
            bad.append((int(image_id), problem))
    return bad
