"""The bench's full-resolution mode: real-sized JPEGs for the rows, synthesised once from the data given.

The real Flowers-102 has a shorter side of 500 px, a longer side of 500 to ~750 px and ~40 KB per JPEG;
decoding such a file costs far more than a 64 px thumbnail. When the data given are thumbnails, each
image the selected rows read is upsampled to a seeded size drawn from that distribution, given a
seeded grain and saved at JPEG quality 90, under `<cache root>/bench/fullres-<digest>/jpg/` in the
Flowers-102 file layout, and the rows get the study's index pointed there, so they build their jobs
and run the real code paths on those files. The digest covers the source (the download unit's key,
which hashes every image) and the rule, so a new dataset or a new rule gets its own folder.

The folder's manifest.json is the commit point: an image is reused only when the manifest lists it
with its size in bytes, and the manifest is rewritten atomically after each chunk of new images, so an
interrupted synthesis leaves only whole, listed images behind (and unlisted files are made again).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy

from .. import atomic, pixels
from ..data import SPLITS, DatasetIndex, image_path
from .options import BenchOptions
from .subsets import proportional_counts, subset_index

# The rule: the real Flowers-102's size distribution and weight (see the module's docstring).
SHORTER_SIDE = 500
LONGER_SIDES = (500, 750)  # inclusive range the longer side is drawn from
QUALITY = 90
# Uniform integer grain of +-1 level on every pixel's three channels alike (luminance only): upsampled
# thumbnails are smoother than photographs, and grain brings the bits per pixel (so the entropy decoding
# work) to the originals' ~40 KB per file (measured: bench.json's resolution.mean_kib).
GRAIN = 1
SEED = 102
RULE = {
    "version": 1,
    "shorter_side": SHORTER_SIDE,
    "longer_sides": list(LONGER_SIDES),
    "quality": QUALITY,
    "grain": GRAIN,
    "seed": SEED,
    "resample": "bicubic",
    "subsampling": "4:2:0",
}
# A source whose images are at least this on the shorter side is full resolution already.
FULL_SIDE = 400
PREFIX = "fullres-"
MANIFEST = "manifest.json"
CHUNK = 64  # images synthesised between two manifest commits


@dataclass(frozen=True)
class FullResolution:
    """The index the rows read in full-resolution mode, and where its images came from (bench.json's `resolution`)."""

    index: DatasetIndex
    source: str  # "given": DATA_DIR holds full-size images; "synthesised": made from it by RULE
    folder: str
    images: int  # images the rows read
    synthesised: int  # of which made by this run (the rest reused from the folder)
    seconds: float
    mean_kib: float  # mean file size of the images the rows read
    shorter_sides: tuple  # (smallest, largest) shorter side among them

    def describe(self) -> str:
        where = "as given" if self.source == "given" else f"synthesised by the rule in {self.folder}"
        made = f", {self.synthesised} made now in {self.seconds:.0f} s" if self.source == "synthesised" else ""
        return (
            f"full resolution: {self.images} images {where}{made}; mean {self.mean_kib:.1f} KiB, "
            f"shorter side {self.shorter_sides[0]}-{self.shorter_sides[1]} px"
        )

    def to_json(self) -> dict:
        return {
            "mode": "full",
            "source": self.source,
            "folder": self.folder,
            "images": self.images,
            "synthesised": self.synthesised,
            "seconds": self.seconds,
            "mean_kib": self.mean_kib,
            "shorter_sides": list(self.shorter_sides),
            "rule": RULE,
        }


def synthesised_size(image_id: int, source_size: tuple) -> tuple[int, int]:
    """(width, height) of image `image_id`'s full-resolution copy: the shorter side SHORTER_SIDE, the longer
    drawn from LONGER_SIDES (seeded by the id), oriented like the source (a square source: seeded too)."""
    generator = numpy.random.default_rng([SEED, int(image_id)])
    longer = int(generator.integers(LONGER_SIDES[0], LONGER_SIDES[1] + 1))
    width, height = source_size
    landscape = width > height if width != height else bool(generator.random() < 0.5)
    return (longer, SHORTER_SIDE) if landscape else (SHORTER_SIDE, longer)


def synthesise(source: Path, image_id: int) -> bytes:
    """The full-resolution JPEG of one source image under RULE (the same bytes on every call)."""
    import simplejpeg
    from PIL import Image

    image = pixels.open_rgb(source)
    width, height = synthesised_size(image_id, image.size)
    upsampled = numpy.asarray(image.resize((width, height), Image.BICUBIC), dtype=numpy.int16)
    generator = numpy.random.default_rng([SEED, int(image_id), 1])
    grain = generator.integers(-GRAIN, GRAIN + 1, size=(height, width, 1), dtype=numpy.int16)
    rows = numpy.clip(upsampled + grain, 0, 255).astype(numpy.uint8)
    return simplejpeg.encode_jpeg(rows, quality=QUALITY, colorspace="RGB", colorsubsampling="420")


def needed_ids(index: DatasetIndex, options: BenchOptions) -> dict:
    """split -> sorted image ids that the selected rows read: each row's own subsets (whole splits for the
    frozen and finetune rows, which read every train and val image), or every image with `synthesise_all`."""
    if options.synthesise_all:
        return {split: numpy.sort(ids) for split, ids in index.image_ids.items()}
    parts = []
    if {"compute", "extraction", "limit", "decode"} & set(options.rows):
        parts.append(subset_index(index, proportional_counts(index, max(8, options.images // options.rounds))))
    if "memory" in options.rows:
        for size in (options.memory_images // 2, options.memory_images):
            parts.append(subset_index(index, proportional_counts(index, size)))
    if "frozen" in options.rows:
        test = options.test_images or len(index.image_ids["test"])
        parts.append(subset_index(index, {"test": test}))
    if "finetune" in options.rows:
        parts.append(subset_index(index, {"val": 0, "test": 0}))
    return {
        split: numpy.unique(numpy.concatenate([part.image_ids[split] for part in parts] or [numpy.zeros(0, int)]))
        for split in index.image_ids
    }


def shorter_sides(paths: list) -> list[int]:
    """The shorter side of each image (from its header; no pixels decoded)."""
    from PIL import Image

    sides = []
    for path in paths:
        with Image.open(path) as image:
            sides.append(min(image.size))
    return sides


def full_resolution_index(
    index: DatasetIndex, source_key: str, options: BenchOptions, cache_root: Path, log: Callable
) -> FullResolution:
    """The index the rows read at full resolution: the given images when they are full-size already, else
    synthesised copies (made once, reused by later runs) of the images the selected rows need."""
    started = time.perf_counter()
    wanted = needed_ids(index, options)
    reading = _paths_of(index, wanted)
    sample = [reading[position] for position in numpy.unique(numpy.linspace(0, len(reading) - 1, 16).astype(int))]
    if min(shorter_sides(sample)) >= FULL_SIDE:
        sides = shorter_sides(reading)
        log(f"[bench] full resolution: DATA_DIR holds full-size images (shorter side {min(sides)}+ px); used as given")
        return FullResolution(
            index, "given", str(index.folder), len(reading), 0, time.perf_counter() - started,
            _mean_kib(reading), (min(sides), max(sides)),
        )  # fmt: skip
    folder = Path(cache_root) / "bench" / f"{PREFIX}{_digest(source_key)}"
    made = synthesise_folder(index, wanted, folder, log)
    # The whole index, pointed at the folder: the rows pick their subsets from it as they would from the
    # study's, and those are the images made above.
    synthesised = replace(index, folder=folder, files=None)
    paths = _paths_of(synthesised, wanted)
    sides = shorter_sides(paths)
    result = FullResolution(
        synthesised, "synthesised", str(folder), len(paths), made, time.perf_counter() - started,
        _mean_kib(paths), (min(sides), max(sides)),
    )  # fmt: skip
    log(f"[bench] {result.describe()}")
    return result


def synthesise_folder(index: DatasetIndex, wanted: dict, folder: Path, log: Callable) -> int:
    """Make every wanted image the folder's manifest does not list yet; returns how many were made."""
    listed = read_manifest(folder)
    sources = {
        int(image_id): path
        for split in SPLITS
        for image_id, path in zip(index.image_ids[split], index.paths(split), strict=True)
    }
    missing = sorted(int(image_id) for ids in wanted.values() for image_id in ids if int(image_id) not in listed)
    if not missing:
        return 0
    log(f"[bench] full resolution: synthesising {len(missing)} images into {folder} ({len(listed)} reused)")

    def make(image_id: int) -> tuple[int, int]:
        data = synthesise(sources[image_id], image_id)
        atomic.write_bytes_atomic(image_path(folder, image_id), data)
        return image_id, len(data)

    # PIL's resampling and libjpeg-turbo's encoder release the GIL, so threads use every core.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(missing), CHUNK):
            listed.update(pool.map(make, missing[start : start + CHUNK]))
            # Re-read first: another bench may have listed images meanwhile (theirs are the same bytes).
            listed = {**read_manifest(folder), **listed}
            atomic.write_json_atomic(
                folder / MANIFEST, {"rule": RULE, "images": {str(key): size for key, size in sorted(listed.items())}}
            )
    return len(missing)


def read_manifest(folder: Path) -> dict:
    """image id -> bytes of every listed image still on disk at that size; {} without a readable manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if manifest.get("rule") != RULE:
        return {}
    listed = {}
    for key, size in manifest.get("images", {}).items():
        path = image_path(folder, int(key))
        if path.is_file() and path.stat().st_size == size:  # a missing or changed file is made again
            listed[int(key)] = size
    return listed


def _digest(source_key: str) -> str:
    return hashlib.sha256(json.dumps({"source": source_key, "rule": RULE}, sort_keys=True).encode()).hexdigest()[:16]


def _paths_of(index: DatasetIndex, wanted: dict) -> list:
    """The files of the wanted ids, split by split."""
    return [
        path
        for split in SPLITS
        for path, keep in zip(index.paths(split), numpy.isin(index.image_ids[split], wanted[split]), strict=True)
        if keep
    ]


def _mean_kib(paths: list) -> float:
    return float(numpy.mean([Path(path).stat().st_size for path in paths])) / 1024 if paths else 0.0
