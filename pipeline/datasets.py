"""Every dataset kind behind one interface: where it lives, its content fingerprint, and its verified index.

`[data] dataset` picks the kind: "flowers102" (pipeline.data, the default), "folder" (an ImageFolder-style
tree) or a torchvision dataset with official splits (pipeline.dataset_kinds.TORCHVISION_KINDS). All kinds
give the same DatasetIndex and pass the same checks, with the same one-line errors: split sizes, labels in
range, disjoint splits, every class in every split, and (with check_images) every image decoding.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy

from . import data, dataset_kinds
from .config import DATASET_KINDS, DataConfig
from .dataset_kinds import DataKindError, Listing

FLOWERS = "flowers102"
KINDS = DATASET_KINDS
OFFICIAL = "official splits"
ARCHIVES = (".tar", ".tgz", ".gz", ".zip")  # downloads kept beside the data: their extracted files are hashed


def dataset_folder(settings: DataConfig, root: Path) -> Path:
    """The folder the dataset's files live under, for the configured root."""
    if settings.dataset == FLOWERS:
        return data.dataset_folder(root)
    if settings.dataset == "folder":
        return Path(root)
    return Path(root) / dataset_kinds.TORCHVISION_KINDS[settings.dataset].folder


def fingerprint(settings: DataConfig, root: Path, memo_path: Path | None = None, write_memo: bool = False) -> str:
    """sha256 over every file of the dataset (images and annotation files), memoised like Flowers'."""
    folder = dataset_folder(settings, root)
    if settings.dataset == FLOWERS:
        return data.fingerprint(folder, memo_path, write_memo)
    if not folder.is_dir():
        return "absent"
    names = []
    for directory, subfolders, files in os.walk(folder):
        subfolders.sort()
        relative = Path(directory).relative_to(folder)
        names += [
            str(relative / name) for name in sorted(files) if not name.startswith(".") and not name.endswith(ARCHIVES)
        ]
    digests = data._file_digests(folder, names, memo_path, write_memo)
    material = "\n".join(f"{name} {digest}" for name, digest in zip(names, digests, strict=True))
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def read(settings: DataConfig, root: Path, seed: int) -> data.DatasetIndex:
    """Read and verify the configured dataset (downloading a torchvision kind when [data] download allows)."""
    if settings.dataset == FLOWERS:
        return data.verify(data.dataset_folder(root), settings)
    try:
        if settings.dataset == "folder":
            listing = dataset_kinds.read_folder(Path(root))
        else:
            listing = dataset_kinds.read_torchvision(settings.dataset, Path(root), settings.download)
        note = OFFICIAL if settings.dataset != "folder" else "the given train/val/test folders"
        if "val" not in listing.files:
            carve_val(listing, settings.val_fraction, seed)
            note = (
                f"val carved from train: a seeded stratified {settings.val_fraction:g} of each class "
                f"([data] val_fraction, split_seed {seed})"
            )
        return verify_listing(listing, settings, note)
    except OSError as error:  # permission denied, a dangling link, an I/O error: never a traceback
        raise data.DataError(data.unreadable_message(error, Path(root))) from None
    except DataKindError as error:
        raise data.DataError(str(error)) from None


def carve_val(listing: Listing, fraction: float, seed: int) -> None:
    """Move a seeded, stratified `fraction` of each class's train images into val (at least one each)."""
    files, labels = listing.files["train"], numpy.asarray(listing.labels["train"], dtype=numpy.int64)
    generator = numpy.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(listing.class_names):
        members = numpy.flatnonzero(labels == label)
        if len(members) < 2:
            raise DataKindError(
                f"class {name!r} has {len(members)} train image(s); carving val from train needs at least 2 "
                "per class (or give a val/ folder)"
            )
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        chosen += generator.choice(members, size=count, replace=False).tolist()
    to_val = numpy.zeros(len(files), dtype=bool)
    to_val[chosen] = True
    # Both parts keep the train order, so the carve depends only on the seed and the data.
    listing.files["val"] = [path for path, moved in zip(files, to_val, strict=True) if moved]
    listing.labels["val"] = labels[to_val].tolist()
    listing.files["train"] = [path for path, moved in zip(files, to_val, strict=True) if not moved]
    listing.labels["train"] = labels[~to_val].tolist()


def verify_listing(listing: Listing, settings: DataConfig, note: str) -> data.DatasetIndex:
    """The Flowers checks, for a listing: sizes, label range, disjoint splits, classes, decodable images."""
    count = len(listing.class_names)
    if settings.num_classes and count != settings.num_classes:
        raise DataKindError(
            f"{listing.base} has {count} classes, expected {settings.num_classes} ([data] num_classes; 0 takes "
            "the number from the data)"
        )
    seen: dict = {}
    for split, expected in zip(data.SPLITS, settings.expected_split_sizes, strict=True):
        files, labels = listing.files[split], listing.labels[split]
        if not files:
            raise DataKindError(f"{listing.base}: split {split} has no images")
        if expected and len(files) != expected:
            raise DataKindError(
                f"{listing.base}: split {split} has {len(files)} images, expected {expected} "
                "([data] expected_split_sizes; 0 skips the check)"
            )
        if min(labels) < 0 or max(labels) >= count:
            raise DataKindError(f"{listing.base}: split {split} has labels outside 0..{count - 1}")
        missing = sorted(set(range(count)) - set(labels))
        if missing:
            raise DataKindError(
                f"{listing.base}: split {split} has no image of class {listing.class_names[missing[0]]!r} "
                f"({len(missing)} classes missing); every class must appear in every split"
            )
        for path in files:
            key = os.path.realpath(path)
            if key in seen:
                raise DataKindError(f"{path} is in both split {seen[key]} and split {split}; splits must be disjoint")
            seen[key] = split
    total = sum(len(files) for files in listing.files.values())
    if settings.expected_images and total != settings.expected_images:
        raise DataKindError(
            f"{listing.base} holds {total} images in its splits, expected {settings.expected_images} "
            "([data] expected_images; 0 skips the check)"
        )
    skipped = _drop_unreadable(listing, settings) if settings.check_images else []
    return index_of(listing, note, skipped)


def _drop_unreadable(listing: Listing, settings: DataConfig) -> list:
    from .pixels import decode_problem

    bad = {
        str(path): problem for files in listing.files.values() for path in files if (problem := decode_problem(path))
    }
    if bad and not settings.skip_bad_images:
        path, reason = next(iter(bad.items()))
        raise DataKindError(
            f"{len(bad)} unreadable image(s), e.g. {path} ({reason}); replace them, or set "
            "[data] skip_bad_images = true to leave them out"
        )
    for split in data.SPLITS:
        keep = [str(path) not in bad for path in listing.files[split]]
        listing.files[split] = [path for path, kept in zip(listing.files[split], keep, strict=True) if kept]
        listing.labels[split] = [label for label, kept in zip(listing.labels[split], keep, strict=True) if kept]
    return [(str(Path(path).relative_to(listing.base)), reason) for path, reason in bad.items()]


def index_of(listing: Listing, note: str, skipped: list) -> data.DatasetIndex:
    """Number the images 1.. across train, val, test (ids only name rows; the files are listed beside them)."""
    image_ids, labels, files, start = {}, {}, {}, 1
    for split in data.SPLITS:
        size = len(listing.files[split])
        image_ids[split] = numpy.arange(start, start + size, dtype=numpy.int64)
        labels[split] = numpy.asarray(listing.labels[split], dtype=numpy.int64)
        files[split] = [str(Path(path).relative_to(listing.base)) for path in listing.files[split]]
        start += size
    return data.DatasetIndex(
        folder=Path(listing.base).resolve(),
        class_names=list(listing.class_names),
        image_ids=image_ids,
        labels=labels,
        skipped=tuple(skipped),
        files=files,
        split_note=note,
    )


def typical_side(index: data.DatasetIndex, split: str = "train") -> int:
    """Median shorter side of a split's images, read from the file headers (no decoding)."""
    from PIL import Image

    sides = []
    for path in index.paths(split):
        with Image.open(path) as image:
            sides.append(min(image.size))
    return int(numpy.median(sides))
