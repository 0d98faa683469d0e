"""A small procedural stand-in for Flowers-102, so `make demo` runs the whole study with nothing to download.

Each class is a shape or pattern (disc, ring, square, ...) drawn anti-aliased at a random position,
size and rotation, in a saturated colour over a muted two-colour gradient with faint stray lines,
pixel noise and JPEG compression: easy for ImageNet features, not trivial for a small network trained
from scratch on ten images per class. Colour is a hint (each class leans towards its own hue, with
overlap), the shape decides.

The output is torchvision's Flowers-102 layout (`flowers-102/jpg/image_NNNNN.jpg`, `imagelabels.mat`,
`setid.mat` with trnid/valid/tstid, ids shuffled across classes as in the real set), plus
`classnames.txt` (read by `pipeline.data`) and `demo.json` (what made it). Every image is a function
of the spec and its id alone, so the same settings write the same bytes. Generation writes into a
temporary folder and renames it into place when complete; a folder this module did not make is
never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy

from . import data
from .config import DataConfig
from .errors import PipelineError

# Bump when the drawing changes, so an existing demo folder is regenerated rather than trusted.
GENERATOR_VERSION = "2"
MARKER = "demo.json"
CLASSES = ("disc", "ring", "square", "triangle", "cross", "stripes", "checker", "dots")
# Spread (standard deviation, in turns of the colour wheel) of a figure's hue around its class's hue.
HUE_JITTER = 0.09


class DemoDataError(PipelineError, RuntimeError):
    """The demo dataset cannot be made where asked (one-line message)."""


@dataclass(frozen=True)
class DemoSpec:
    """What the generated dataset looks like; recorded in demo.json."""

    num_classes: int = 8
    per_class: tuple = (10, 10, 20)  # train, val, test images per class
    pixels: int = 96
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(CLASSES):
            raise DemoDataError(
                f"the demo dataset has 2 to {len(CLASSES)} classes ({', '.join(CLASSES)}), not {self.num_classes}"
            )
        if len(self.per_class) != 3 or min(self.per_class) < 1:
            raise DemoDataError(f"per_class must be 3 positive counts (train, val, test), not {self.per_class}")
        if self.pixels < 16:
            raise DemoDataError(f"demo images need at least 16 pixels a side, not {self.pixels}")

    @property
    def total(self) -> int:
        return self.num_classes * sum(self.per_class)

    def split_sizes(self) -> list[int]:
        return [self.num_classes * count for count in self.per_class]

    def to_json(self) -> dict:
        return {
            "generator_version": GENERATOR_VERSION,
            **asdict(self),
            "per_class": list(self.per_class),
            "classes": list(CLASSES[: self.num_classes]),
        }


def spec_for(settings: DataConfig, pixels: int = 96, seed: int = 0) -> DemoSpec:
    """The demo dataset that a config's [data] section expects (split sizes divide evenly by class)."""
    sizes = list(settings.expected_split_sizes)
    if len(sizes) != 3 or any(size % settings.num_classes for size in sizes):
        raise DemoDataError(
            f"[data] expected_split_sizes {sizes} must be 3 multiples of num_classes "
            f"({settings.num_classes}) for the demo dataset"
        )
    spec = DemoSpec(settings.num_classes, tuple(size // settings.num_classes for size in sizes), pixels, seed)
    if spec.total != settings.expected_images:
        raise DemoDataError(
            f"[data] expected_images is {settings.expected_images}, but the splits add up to {spec.total}"
        )
    return spec


def data_settings(spec: DemoSpec) -> DataConfig:
    """The [data] settings under which `pipeline.data.verify` accepts this dataset."""
    return DataConfig(
        check_md5=False,
        download=False,
        num_classes=spec.num_classes,
        expected_images=spec.total,
        expected_split_sizes=spec.split_sizes(),
    )


# --- drawing ---------------------------------------------------------------------------------------


def _soft(distance: numpy.ndarray) -> numpy.ndarray:
    """Coverage of a pixel from the signed distance (pixels, negative inside) to a shape's edge."""
    return numpy.clip(0.5 - distance, 0.0, 1.0)


def _box(u, v, half_u, half_v):
    return numpy.maximum(numpy.abs(u) - half_u, numpy.abs(v) - half_v)


def _stripes(u, period):
    return numpy.abs(numpy.mod(u, period) - period / 2) - period / 4


def shape_alpha(name: str, u: numpy.ndarray, v: numpy.ndarray, size: float, rng: numpy.random.Generator):
    """Coverage (0..1) of one class's figure in local coordinates (pixels, centred, already rotated)."""
    radius = numpy.hypot(u, v)
    if name == "disc":
        return _soft(radius - 0.85 * size)
    if name == "ring":
        return _soft(numpy.abs(radius - 0.72 * size) - 0.2 * size)
    if name == "square":
        return _soft(_box(u, v, 0.75 * size, 0.75 * size))
    if name == "triangle":
        angles = numpy.pi / 2 + 2 * numpy.pi * numpy.arange(3) / 3
        edges = [numpy.cos(angle) * u + numpy.sin(angle) * v for angle in angles]
        return _soft(numpy.maximum.reduce(edges) - 0.5 * size)
    if name == "cross":
        return _soft(numpy.minimum(_box(u, v, 0.95 * size, 0.24 * size), _box(u, v, 0.24 * size, 0.95 * size)))
    if name == "stripes":
        period = size * rng.uniform(0.35, 0.55)
        return _soft(_box(u, v, 0.85 * size, 0.85 * size)) * _soft(_stripes(u, period))
    if name == "checker":
        period = size * rng.uniform(0.5, 0.8)
        across, down = _soft(_stripes(u, period)), _soft(_stripes(v, period))
        return _soft(_box(u, v, 0.85 * size, 0.85 * size)) * (across * (1 - down) + down * (1 - across))
    if name == "dots":
        count = int(rng.integers(5, 9))
        angles = rng.uniform(0, 2 * numpy.pi, count)
        reach = size * numpy.sqrt(rng.uniform(0.05, 1.0, count)) * 0.8
        radii = size * rng.uniform(0.12, 0.2, count)
        distance = numpy.min(
            [
                numpy.hypot(u - r * numpy.cos(a), v - r * numpy.sin(a)) - dot
                for a, r, dot in zip(angles, reach, radii, strict=True)
            ],
            axis=0,
        )
        return _soft(distance)
    raise DemoDataError(f"unknown demo class {name!r}; classes: {', '.join(CLASSES)}")


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> numpy.ndarray:
    import colorsys

    return 255.0 * numpy.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _colours(label: int, spec: DemoSpec, rng: numpy.random.Generator):
    """Two muted background colours and a saturated figure colour that stands out from both.

    The figure's hue leans towards its class's own hue (classes spread evenly around the colour
    wheel, jittered by HUE_JITTER, so neighbouring classes overlap): colour is a hint, as with real
    flowers on foliage, while the shape decides.
    """
    while True:
        first, second = (_hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.35), rng.uniform(0.2, 0.95)) for _ in "ab")
        hue = label / spec.num_classes + rng.normal(0, HUE_JITTER)
        figure = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
        if min(numpy.linalg.norm(figure - first), numpy.linalg.norm(figure - second)) > 90:
            return first, second, figure


def render(label: int, image_id: int, spec: DemoSpec) -> numpy.ndarray:
    """One image (uint8 HxWx3) of class `label` (0-based); a function of (spec.seed, image_id, label) only."""
    rng = numpy.random.default_rng([spec.seed, image_id])
    pixels = spec.pixels
    y, x = numpy.mgrid[0:pixels, 0:pixels].astype(numpy.float64) + 0.5
    first, second, figure = _colours(label, spec, rng)
    direction = rng.uniform(0, 2 * numpy.pi)
    ramp = (numpy.cos(direction) * x + numpy.sin(direction) * y) / pixels
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9)
    image = first + ramp[..., None] * (second - first)
    # A few faint lines that belong to no class.
    for _ in range(int(rng.integers(0, 3))):
        angle, offset = rng.uniform(0, numpy.pi), rng.uniform(-0.4, 0.4) * pixels
        line = numpy.abs(numpy.cos(angle) * (x - pixels / 2) + numpy.sin(angle) * (y - pixels / 2) - offset)
        coverage = _soft(line - rng.uniform(0.5, 1.5)) * rng.uniform(0.2, 0.45)
        image = image + coverage[..., None] * (rng.uniform(0, 255, 3) - image)
    size = pixels * rng.uniform(0.16, 0.3)
    centre = rng.uniform(0.85 * size, pixels - 0.85 * size, 2)
    rotation = rng.uniform(0, 2 * numpy.pi)
    dx, dy = x - centre[0], y - centre[1]
    u = numpy.cos(rotation) * dx + numpy.sin(rotation) * dy
    v = -numpy.sin(rotation) * dx + numpy.cos(rotation) * dy
    alpha = shape_alpha(CLASSES[label], u, v, size, rng)
    image = image + alpha[..., None] * (figure - image)
    image = image + rng.normal(0, rng.uniform(8, 24), image.shape)
    return numpy.clip(numpy.rint(image), 0, 255).astype(numpy.uint8)


def assignment(spec: DemoSpec) -> tuple[numpy.ndarray, dict]:
    """1-based labels of images 1..total, and the 1-based image ids of each split."""
    rng = numpy.random.default_rng([spec.seed, 0x5EED])
    labels = numpy.repeat(numpy.arange(1, spec.num_classes + 1), sum(spec.per_class))
    labels = labels[rng.permutation(spec.total)]  # ids shuffled across classes, as in the real set
    split_ids = {split: [] for split in data.SPLITS}
    for label in range(1, spec.num_classes + 1):
        ids = numpy.flatnonzero(labels == label) + 1
        start = 0
        for split, count in zip(data.SPLITS, spec.per_class, strict=True):
            split_ids[split] += ids[start : start + count].tolist()
            start += count
    return labels, {split: numpy.sort(numpy.asarray(ids, dtype=numpy.int64)) for split, ids in split_ids.items()}


def _write_mat(path: Path, variables: dict) -> None:
    """savemat with a fixed header text: scipy stamps the time there, and these files' md5 is part of the
    download stage's key, so regenerated data would otherwise rebuild every stage."""
    import io

    from scipy.io import savemat

    buffer = io.BytesIO()
    savemat(buffer, variables)
    header = b"MATLAB 5.0 MAT-file, written by flowers-transfer's demo generator".ljust(116)
    path.write_bytes(header + buffer.getvalue()[116:])


def write(folder: Path, spec: DemoSpec) -> None:
    """Write the whole dataset into `folder` (the flowers-102 folder itself)."""
    from PIL import Image

    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    labels, split_ids = assignment(spec)
    for image_id, label in enumerate(labels, start=1):
        Image.fromarray(render(int(label) - 1, image_id, spec)).save(
            data.image_path(folder, image_id), quality=spec.jpeg_quality
        )
    _write_mat(folder / "imagelabels.mat", {"labels": labels.astype(numpy.uint8).reshape(1, -1)})
    _write_mat(
        folder / "setid.mat",
        {key: split_ids[split].astype(numpy.uint16).reshape(1, -1) for split, key in data.SPLIT_KEYS.items()},
    )
    (folder / data.CLASS_NAMES_FILE).write_text("\n".join(CLASSES[: spec.num_classes]) + "\n")
    (folder / MARKER).write_text(json.dumps(spec.to_json(), indent=2) + "\n")


def made_here(folder: Path) -> dict | None:
    """The recorded spec of a folder this module generated, else None."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure(root: str | Path, spec: DemoSpec, force: bool = False, log=print) -> Path:
    """Make `<root>/flowers-102` hold the demo dataset for `spec`; keep it when it already does.

    Returns the root. Refuses to replace a flowers-102 folder that this module did not write.
    """
    root = Path(root).expanduser()
    folder = root / data.FOLDER
    recorded = made_here(folder)
    if folder.exists() and recorded is None:
        raise DemoDataError(
            f"{folder} exists and was not made by the demo generator (no {MARKER}); "
            "move it away or point the demo at another folder"
        )
    if not force and recorded == spec.to_json():
        try:
            data.verify(folder, data_settings(spec))
        except data.DataError as error:
            log(f"[demo-data] {folder} is damaged ({error}); regenerating")
        else:
            log(f"[demo-data] {folder}: cached ({spec.total} images, {spec.num_classes} classes)")
            return root
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f"{data.FOLDER}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    log(
        f"[demo-data] writing {spec.total} procedural {spec.pixels} px images of {spec.num_classes} classes "
        f"({', '.join(CLASSES[: spec.num_classes])}) into {folder}"
    )
    try:
        write(partial, spec)
        data.verify(partial, data_settings(spec))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.demo_data --config configs/demo.toml`: generate the demo dataset at [data] root."""
    from .cli import guarded, load, parser

    def action():
        arguments = parser("Generate the demo's procedural dataset at [data] root (skipped when present).")
        arguments.add_argument("--pixels", type=int, default=DemoSpec.pixels, help="image side (default %(default)s)")
        arguments.add_argument(
            "--data-seed", type=int, default=DemoSpec.seed, help="seed of the images and splits (default %(default)s)"
        )
        parsed = arguments.parse_args(argv)
        config = load(parsed)
        spec = spec_for(config.data, pixels=parsed.pixels, seed=parsed.data_seed)
        ensure(config.data.root, spec, force=parsed.force)

    return guarded(action)
