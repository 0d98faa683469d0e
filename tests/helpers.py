"""Plain helpers shared by the tests (not a test module): the fake Flowers-102 writer and the tiny config.

Test modules import these by name (`from helpers import make_tiny_config`); fixtures live in
conftest.py, which is never imported directly. A stage run as a subprocess can import this module too.
"""

from __future__ import annotations

from pathlib import Path

import numpy

PROJECT = Path(__file__).resolve().parents[1]
FAKE_CLASSES = 6
FAKE_SPLIT_PER_CLASS = {"train": 4, "val": 4, "test": 6}
FAKE_IMAGE_PIXELS = 32


def write_fake_flowers(
    root: Path,
    classes: int = FAKE_CLASSES,
    per_class: dict | None = None,
    pixels: int = FAKE_IMAGE_PIXELS,
    seed: int = 0,
) -> Path:
    """A Flowers-102 look-alike in torchvision's layout: JPEGs whose colour and stripes depend on the class."""
    from PIL import Image
    from scipy.io import savemat

    per_class = per_class or FAKE_SPLIT_PER_CLASS
    folder = Path(root) / "flowers-102"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    generator = numpy.random.default_rng(seed)
    total = classes * sum(per_class.values())
    labels = numpy.repeat(numpy.arange(1, classes + 1), sum(per_class.values()))
    order = generator.permutation(total)  # ids are shuffled across classes, as in the real set
    labels = labels[order]
    split_ids = {split: [] for split in per_class}
    for label in range(1, classes + 1):
        ids = numpy.flatnonzero(labels == label) + 1
        start = 0
        for split, count in per_class.items():
            split_ids[split] += ids[start : start + count].tolist()
            start += count
    hues = numpy.linspace(0, 255, classes, endpoint=False)
    for image_id, label in enumerate(labels, start=1):
        base = numpy.zeros((pixels, pixels, 3), dtype=numpy.float64)
        base[..., 0] = hues[label - 1]
        base[..., 1] = 255 - hues[label - 1]
        stripes = (numpy.arange(pixels) // max(1, (label + 1)) % 2) * 80
        base[..., 2] = stripes[None, :]
        noisy = base + generator.normal(0, 20, base.shape)
        Image.fromarray(numpy.clip(noisy, 0, 255).astype(numpy.uint8)).save(
            folder / "jpg" / f"image_{image_id:05d}.jpg", quality=90
        )
    savemat(folder / "imagelabels.mat", {"labels": labels.astype(numpy.uint8).reshape(1, -1)})
    savemat(
        folder / "setid.mat",
        {
            "trnid": numpy.array(split_ids["train"], dtype=numpy.uint16).reshape(1, -1),
            "valid": numpy.array(split_ids["val"], dtype=numpy.uint16).reshape(1, -1),
            "tstid": numpy.array(split_ids["test"], dtype=numpy.uint16).reshape(1, -1),
        },
    )
    return Path(root)


def make_tiny_config(data_root: Path, cache_root: Path, overrides: tuple = ()):
    from pipeline.config import load_config

    return load_config(
        PROJECT / "configs" / "tiny.toml", [f'data.root="{data_root}"', f'cache.root="{cache_root}"', *overrides]
    )


def stage_arguments(data: Path, cache_root: Path, *overrides: str) -> list[str]:
    """Command-line arguments of a stage on the tiny config, fake data and a private cache, one thread."""
    arguments = [
        "--config",
        "configs/tiny.toml",
        "--data-dir",
        str(data),
        "--set",
        f'cache.root="{cache_root}"',
        "--set",
        "runtime.threads=1",
    ]
    for override in overrides:
        arguments += ["--set", override]
    return arguments


def one_line_error(capsys) -> str:
    """The stderr a failed command printed, checked to be the promised single `error: ...` line."""
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error
