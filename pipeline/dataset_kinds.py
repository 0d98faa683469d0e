"""Reading the non-Flowers dataset kinds into per-split file lists: an ImageFolder-style tree and the
torchvision datasets with official splits (read, and downloaded, through torchvision's own classes).

Each reader returns a `Listing`; pipeline.datasets verifies it and turns it into a DatasetIndex.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_SPLITS = ("train", "val", "test")


class DataKindError(PipelineError, RuntimeError):
    """A dataset of a non-Flowers kind is missing or laid out wrongly (one-line message)."""


@dataclass
class Listing:
    """Every split's files (absolute paths) and 0-based labels, before verification."""

    base: Path  # folder the paths are stored relative to
    class_names: list
    files: dict = field(default_factory=dict)  # split -> list[Path]
    labels: dict = field(default_factory=dict)  # split -> list[int]
    fingerprinted: list = field(default_factory=list)  # annotation files hashed besides the images


@dataclass(frozen=True)
class TorchvisionKind:
    """A torchvision dataset class, where it keeps its files, and which of its splits feed ours."""

    title: str
    dataset_class: str  # name in torchvision.datasets
    folder: str  # torchvision's folder under the root
    splits: dict  # our split -> torchvision's split name (no "val": carved from train)
    images_attribute: str  # where the class keeps its image paths
    layout: str  # what a user must place, for the offline error


TORCHVISION_KINDS = {
    "oxford_iiit_pet": TorchvisionKind(
        "Oxford-IIIT Pet",
        "OxfordIIITPet",
        "oxford-iiit-pet",
        {"train": "trainval", "test": "test"},
        "_images",
        "images/*.jpg and annotations/{trainval,test}.txt (images.tar.gz and annotations.tar.gz)",
    ),
    "dtd": TorchvisionKind(
        "Describable Textures (DTD), partition 1",
        "DTD",
        "dtd",
        {"train": "train", "val": "val", "test": "test"},
        "_image_files",
        "dtd/images/<class>/*.jpg and dtd/labels/{train,val,test}1.txt (dtd-r1.0.1.tar.gz)",
    ),
    "fgvc_aircraft": TorchvisionKind(
        "FGVC-Aircraft (variants)",
        "FGVCAircraft",
        "fgvc-aircraft-2013b",
        {"train": "train", "val": "val", "test": "test"},
        "_image_files",
        "data/images/*.jpg, data/variants.txt and data/images_variant_{train,val,test}.txt "
        "(fgvc-aircraft-2013b.tar.gz)",
    ),
}


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(split_folder: Path) -> dict:
    """class name -> sorted image paths, for one split folder of the tree."""
    classes = {}
    with os.scandir(split_folder) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                with os.scandir(entry.path) as files:
                    images = sorted(Path(file.path) for file in files if file.is_file() and _is_image(file.name))
                classes[entry.name] = images
    return classes


def read_folder(root: Path) -> Listing:
    """An ImageFolder-style tree: root/train/<class>/*, root/test/<class>/*, optionally root/val/<class>/*."""
    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataKindError(
                f"folder dataset not found: {root / split} is missing; expected {root}/train/<class>/*.jpg, "
                f"{root}/test/<class>/*.jpg and optionally {root}/val/<class>/*.jpg (pass DATA_DIR=<that folder>)"
            )
    present = [split for split in FOLDER_SPLITS if (root / split).is_dir()]
    per_split = {split: _class_folders(root / split) for split in present}
    # Sorted folder names are the classes, so label order never depends on the file system.
    names = sorted(per_split["train"])
    if not names:
        raise DataKindError(f"{root / 'train'} holds no class folders; expected {root}/train/<class>/*.jpg")
    for split, classes in per_split.items():
        if sorted(classes) != names:
            extra, missing = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise DataKindError(
                f"{root / split} has other classes than train: missing {missing[:3]}, extra {extra[:3]}; "
                "every split needs the same class folders"
            )
        empty = [name for name in names if not classes[name]]
        if empty:
            raise DataKindError(f"{root / split / empty[0]} holds no images; every class needs images in every split")
    listing = Listing(base=root, class_names=names)
    for split, classes in per_split.items():
        # Listed by file name, then class: a tree whose names carry an order (as a re-laid Flowers-102
        # does, `make check-real`) keeps it; a tree named per class stays grouped by class.
        rows = sorted((path.name, label, path) for label, name in enumerate(names) for path in classes[name])
        listing.files[split] = [path for _, _, path in rows]
        listing.labels[split] = [label for _, label, _ in rows]
    return listing


def read_torchvision(kind: str, root: Path, download: bool) -> Listing:
    """The splits of a torchvision dataset under `root`, read by torchvision's class (downloading if asked)."""
    import torchvision.datasets

    spec = TORCHVISION_KINDS[kind]
    root = Path(root)
    dataset_class = getattr(torchvision.datasets, spec.dataset_class)
    listing = None
    for split, their_split in spec.splits.items():
        try:
            dataset = dataset_class(root=str(root), split=their_split, download=download)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError...: all mean "not here"
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:160]
            raise DataKindError(
                f"{spec.title} not found under {root} ({reason}); place {spec.layout} in {root / spec.folder}/ "
                "(torchvision's layout) and pass DATA_DIR=<folder holding it>, or enable [data] download with "
                "internet"
            ) from None
        if listing is None:
            listing = Listing(base=root / spec.folder, class_names=list(dataset.classes))
        listing.files[split] = [Path(path) for path in getattr(dataset, spec.images_attribute)]
        listing.labels[split] = [int(label) for label in dataset._labels]
    listing.fingerprinted = sorted(
        path
        for path in listing.base.rglob("*.txt")
        if path.is_file() and "images" not in path.relative_to(listing.base).parts
    )
    return listing
