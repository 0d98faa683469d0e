"""The end-to-end arms' image cache: uint8 pixels decoded once, read from disk a batch at a time.

Every split is stored as its exact eval pixels at the arm's input size (`pixels.eval_pipeline`: what
extraction feeds its model before normalising), and the train split also as squares of `stored_size`
(shorter side resized, centre-cropped, with the same uint8 steps), the source of its random crops.
So val and test, the linear probe's train features, training with augmentation "none" or "flip" and
predict all see extraction's eval pixels, bit for bit. Only random crops (crop-flip and the policies)
come from the squares: an optional per-image policy (TrivialAugment / RandAugment) on the stored
square, then one batched `grid_sample` that does random-resized-crop, horizontal flip and the resize
to the input size, rounded back to uint8 and normalised like every other batch.

Each array is an .npy file under `<cache root>/images/`, written row by row through a temporary name
while the images decode, with its sha256 recorded in a .json beside it and checked on load. Batches
are read with plain positional reads, so neither building nor training holds a split in memory: a
memory map would read the same bytes, but every page it touches counts as the process's resident
memory until it is unmapped, which grows with the number of images read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F

from . import atomic, integrity, pixels
from .backbones import Preprocessing
from .data import SPLITS, DatasetIndex
from .errors import PipelineError
from .extract import in_streams
from .transforms import crop_sizes

# Bump when the stored pixels would change (decoder, resize method, crop rule), so old arrays are never reused.
STORE_VERSION = "2"
# torchvision's RandomResizedCrop aspect-ratio range.
ASPECT_RATIOS = (3 / 4, 4 / 3)
# Rows copied per step when a split moves to an accelerator whole.
DEVICE_CHUNK_ROWS = 256


class ImageCacheError(PipelineError, RuntimeError):
    """An image cache file that is not the uint8 array it should be."""


def store_folder(cache_root: Path, download_key: str) -> Path:
    """Where the uint8 arrays for one dataset (by its download key) live; each file names its own recipe."""
    return Path(cache_root) / "images" / f"{download_key[:16]}-v{STORE_VERSION}"


class PixelStore:
    """The uint8 rows [N, H, W, 3] of one .npy file; indexing with positions reads just those rows from disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                version = numpy.lib.format.read_magic(handle)
                read_header = numpy.lib.format.read_array_header_1_0
                if version != (1, 0):
                    read_header = numpy.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(handle)
                self.offset = handle.tell()
        except ValueError as error:
            raise ImageCacheError(f"{self.path} is not an image cache array ({error}); delete it") from None
        if dtype != numpy.uint8 or fortran_order or len(shape) != 4:
            raise ImageCacheError(f"{self.path} holds {dtype} {shape}, not uint8 [N, H, W, 3] rows; delete it")
        self.shape = tuple(shape)
        self.row_bytes = math.prod(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions) -> torch.Tensor:
        """uint8 tensor [len(positions), H, W, 3]; each run of consecutive positions is one read."""
        wanted = torch.as_tensor(positions).reshape(-1).tolist()
        if wanted and (min(wanted) < 0 or max(wanted) >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1} of {self.path}")
        rows = numpy.empty((len(wanted), *self.shape[1:]), dtype=numpy.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            first = 0
            while first < len(wanted):
                last = first + 1
                while last < len(wanted) and wanted[last] == wanted[last - 1] + 1:
                    last += 1
                handle.seek(self.offset + wanted[first] * self.row_bytes)
                view = memoryview(rows[first:last]).cast("B")
                done = 0
                while done < len(view):
                    count = handle.readinto(view[done:])
                    if not count:
                        raise ImageCacheError(f"{self.path} ends early; delete it and rerun to decode the images again")
                    done += count
                first = last
        return torch.from_numpy(rows)

    def to(self, device: str) -> PixelStore | torch.Tensor:
        """Itself on the CPU; on an accelerator, the whole array in its memory (copied in chunks)."""
        if torch.device(device).type == "cpu":
            return self
        whole = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for start in range(0, len(self), DEVICE_CHUNK_ROWS):
            stop = min(len(self), start + DEVICE_CHUNK_ROWS)
            whole[start:stop] = self[torch.arange(start, stop)].to(device)
        return whole


def load_rows(
    index: DatasetIndex,
    split: str,
    path: Path,
    pipeline: pixels.TensorPipeline,
    row_shape: tuple,
    log: Callable[[str], None] = print,
) -> PixelStore:
    """The rows `pipeline` makes of each image of `split`, decoded once into `path` and checked by digest after."""
    path = Path(path)
    expected = [int(image_id) for image_id in index.image_ids[split]]
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            # The digest recorded when the array was written: a damaged array is decoded again, never used.
            if meta.get("image_ids") == expected and meta.get("sha256") == integrity.file_digest(path):
                store = PixelStore(path)
                if store.shape == (len(expected), *row_shape):
                    return store
            elif meta.get("image_ids") == expected:
                log(f"[images] {path} is damaged or unverified (sha256 differs from the one recorded); decoding again")
        except (OSError, ValueError, ImageCacheError):
            pass  # unreadable or torn: rebuild below
    paths = index.paths(split)
    log(f"[images] decoding {len(paths)} {split} images once into {path.name} ({path.parent})")
    digest = write_rows(path, paths, pipeline, row_shape)
    atomic.write_json_atomic(
        meta_path, {"split": split, "shape": [len(paths), *row_shape], "image_ids": expected, "sha256": digest}
    )
    return PixelStore(path)


def write_rows(path: Path, paths: list, pipeline: pixels.TensorPipeline, row_shape: tuple) -> str:
    """Write the rows of every image into an .npy file at `path` as they decode; returns the file's sha256.

    Images decode on one thread per core (simplejpeg and torch's resampling release the GIL), a few
    ahead of the writer, so memory holds a handful of rows whatever the number of images.
    """
    header = io.BytesIO()
    numpy.lib.format.write_array_header_1_0(
        header,
        {
            "descr": numpy.lib.format.dtype_to_descr(numpy.dtype(numpy.uint8)),
            "fortran_order": False,
            "shape": (len(paths), *row_shape),
        },
    )
    digest = hashlib.sha256(header.getvalue())
    with atomic.atomic_path(path) as temporary, open(temporary, "wb") as handle:
        atomic.require_free_space(path, len(paths) * math.prod(row_shape))
        handle.write(header.getvalue())
        rows = in_streams(lambda item: pixels.load_pixels(item, pipeline), paths, os.cpu_count() or 1)
        with contextlib.closing(rows):  # an error stops the decoding threads
            for source, row in zip(paths, rows, strict=True):
                if tuple(row.shape) != row_shape:
                    raise ImageCacheError(f"{source} gave pixels of shape {tuple(row.shape)}, expected {row_shape}")
                data = numpy.ascontiguousarray(row.numpy())
                handle.write(data)
                digest.update(data)
    return digest.hexdigest()


@dataclass
class ImageSet:
    """One split as uint8 eval rows (and, to train on, stored squares), turned into normalised float batches."""

    rows: torch.Tensor | PixelStore  # uint8 [N, C, C, 3]: the eval pixels at the input size
    labels: torch.Tensor  # int64 [N]
    preprocessing: Preprocessing
    squares: torch.Tensor | PixelStore | None = None  # uint8 [N, S, S, 3]: the source of random crops

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_size(self) -> int:
        return int(self.rows.shape[1])

    def to(self, device: str) -> ImageSet:
        squares = None if self.squares is None else self.squares.to(device)
        return ImageSet(self.rows.to(device), self.labels.to(device), self.preprocessing, squares)

    def subset(self, choose: Callable) -> ImageSet:
        """The images `choose` (labels as numpy -> row indices) keeps, in that order, read into memory."""
        positions = torch.as_tensor(choose(self.labels.cpu().numpy()), dtype=torch.int64)
        squares = None if self.squares is None else self.squares[positions]
        return ImageSet(self.rows[positions], self.labels[positions], self.preprocessing, squares)

    def _normalise(self, rows: torch.Tensor) -> torch.Tensor:
        return pixels.normalise(rows, self.preprocessing.mean, self.preprocessing.std)

    def eval_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """The eval pixels of the images at `positions`, normalised as extraction normalises them."""
        return self._normalise(self.rows[positions])

    def train_batch(
        self, positions: torch.Tensor, augmentation: str, minimum_scale: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Augmented batch: the eval pixels (flipped at random for "flip"), or an optional policy per stored
        square, then batched random-resized-crop + flip + resize, rounded to uint8 like every other batch."""
        if augmentation == "none":
            return self.eval_batch(positions)
        count = len(positions)
        if augmentation == "flip":
            base = self.eval_batch(positions)
            flips = torch.rand(count, generator=generator) < 0.5
            return torch.where(flips.view(-1, 1, 1, 1).to(base.device), base.flip(-1), base)
        if self.squares is None:
            raise ValueError(f"augmentation {augmentation!r} crops stored squares, and this split has none")
        images = self.squares[positions].permute(0, 3, 1, 2)
        if augmentation in ("trivialaugment", "randaugment"):
            images = apply_policy(images, augmentation, self.preprocessing.interpolation)
        theta = random_crop_affines(count, minimum_scale, generator).to(images.device)
        grid = F.affine_grid(theta, [count, 3, self.input_size, self.input_size], align_corners=False)
        mode = "bicubic" if self.preprocessing.interpolation == "bicubic" else "bilinear"
        cropped = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        return self._normalise(cropped.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Index tensors of each batch (shuffled with `generator` when asked)."""
        count = len(self)
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        stop = count - count % batch_size if drop_last and count > batch_size else count
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]


def random_crop_affines(count: int, minimum_scale: float, generator: torch.Generator) -> torch.Tensor:
    """[count, 2, 3] affine maps for `affine_grid`: random area in [minimum_scale, 1], aspect 3/4..4/3, flip.

    Unlike torchvision's ten-try rejection loop, a side that would leave the image is clamped to it,
    so every draw is used; the crop centre is uniform over the positions that keep it inside.
    """
    area = torch.empty(count).uniform_(minimum_scale, 1.0, generator=generator)
    log_ratio = torch.empty(count).uniform_(math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1]), generator=generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # Normalised coordinates span [-1, 1]: a crop of relative width w may centre anywhere in ±(1 - w).
    centre_x = (torch.rand(count, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(count, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta


def apply_policy(images: torch.Tensor, augmentation: str, interpolation: str) -> torch.Tensor:
    """TrivialAugmentWide or RandAugment on each uint8 image separately (one random op draw per image).

    Applied at the stored size before cropping, where it is cheapest; it draws from torch's global
    RNG, which the training loop seeds per epoch so a resumed run repeats the same draws.
    """
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    policy = (
        v2.TrivialAugmentWide(interpolation=mode)
        if augmentation == "trivialaugment"
        else v2.RandAugment(interpolation=mode)
    )
    return torch.stack([policy(image) for image in images])


def load_image_sets(
    index: DatasetIndex,
    folder: Path,
    stored_size: int,
    preprocessing: Preprocessing,
    input_size: int,
    log: Callable[[str], None] = print,
    splits: tuple = SPLITS,
) -> dict[str, ImageSet]:
    """{split: ImageSet} from the cache in `folder` (built on first use): eval rows of every split at
    `input_size`, plus the train split's `stored_size` squares."""
    resize, crop = crop_sizes(preprocessing, input_size)
    interpolation = preprocessing.interpolation
    evaluation, _, _ = pixels.eval_pipeline(preprocessing, input_size)
    sets = {}
    for split in splits:
        path = Path(folder) / f"{split}-eval-{crop}-of-{resize}-{interpolation}.npy"
        rows = load_rows(index, split, path, evaluation, (crop, crop, 3), log)
        squares = None
        if split == "train":
            path = Path(folder) / f"train-square-{stored_size}-{interpolation}.npy"
            square = pixels.square_pipeline(stored_size, interpolation)
            squares = load_rows(index, split, path, square, (stored_size, stored_size, 3), log)
        sets[split] = ImageSet(rows, torch.as_tensor(index.labels[split], dtype=torch.int64), preprocessing, squares)
    return sets


def eval_set(paths: list, preprocessing: Preprocessing, input_size: int) -> ImageSet:
    """Images read into memory as the cache stores its eval splits (labels 0): what predict feeds an end-to-end arm."""
    evaluation, _, _ = pixels.eval_pipeline(preprocessing, input_size)
    rows = torch.stack([pixels.load_pixels(path, evaluation) for path in paths])
    return ImageSet(rows, torch.zeros(len(paths), dtype=torch.int64), preprocessing)
