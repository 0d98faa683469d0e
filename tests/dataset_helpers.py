"""Fake datasets of every non-Flowers kind, laid out as pipeline.datasets and torchvision expect (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy

CLASSES = ("apple", "birch", "cedar", "daisy")


def fake_image(path: Path, label: int, generator, pixels: int = 32) -> None:
    """A small JPEG whose colour depends on the class, with noise so that no two are the same."""
    from PIL import Image

    base = numpy.zeros((pixels, pixels, 3))
    base[..., label % 3] = 60 + 50 * label
    noisy = numpy.clip(base + generator.normal(0, 20, base.shape), 0, 255).astype(numpy.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(path, quality=90)


def write_folder_tree(root: Path, per_class: dict, classes=CLASSES, seed: int = 0) -> Path:
    """root/<split>/<class>/<class>_<n>.jpg for each split in `per_class` (split -> images per class)."""
    generator = numpy.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            for number in range(count):
                fake_image(Path(root) / split / name / f"{name}_{split}_{number:03d}.jpg", label, generator)
    return Path(root)


def write_fake_pet(root: Path, per_class: dict, seed: int = 0) -> Path:
    """torchvision's OxfordIIITPet layout: images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt."""
    generator = numpy.random.default_rng(seed)
    folder = Path(root) / "oxford-iiit-pet"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    number = 0
    for split, count in per_class.items():
        lines = []
        for label, name in enumerate(CLASSES):
            for _ in range(count):
                number += 1
                image_id = f"{name.capitalize()}_{number}"
                fake_image(folder / "images" / f"{image_id}.jpg", label, generator)
                lines.append(f"{image_id} {label + 1} {label % 2 + 1} 1")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def write_fake_dtd(root: Path, per_class: int, seed: int = 0) -> Path:
    """torchvision's DTD layout: dtd/dtd/images/<class>/*.jpg, dtd/dtd/labels/{train,val,test}1.txt."""
    generator = numpy.random.default_rng(seed)
    folder = Path(root) / "dtd" / "dtd"
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        lines = []
        for label, name in enumerate(CLASSES):
            for number in range(per_class):
                relative = f"{name}/{name}_{split}_{number:04d}.jpg"
                fake_image(folder / "images" / relative, label, generator)
                lines.append(relative)
        (folder / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def write_fake_aircraft(root: Path, per_class: int, seed: int = 0) -> Path:
    """torchvision's FGVCAircraft layout: data/images/<id>.jpg, data/variants.txt, data/images_variant_<split>.txt."""
    generator = numpy.random.default_rng(seed)
    folder = Path(root) / "fgvc-aircraft-2013b" / "data"
    variants = [f"{name.upper()}-{index}00" for index, name in enumerate(CLASSES)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    number = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_class):
                number += 1
                fake_image(folder / "images" / f"{number}.jpg", label, generator)
                lines.append(f"{number} {variant}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)
