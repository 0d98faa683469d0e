"""Pre-resized uint8 image cache and batched, tensor-side augmentation for the end-to-end arms.

JPEG decoding is paid once per (dataset, stored size): every image is resized so its shorter side is
`stored_size`, center-cropped square and saved as one uint8 array per split under
`<cache root>/images/`. Training then works on tensors only: an optional per-image policy
(TrivialAugment / RandAugment) on the stored uint8 image, then one batched `grid_sample` that does
random-resized-crop, horizontal flip and the resize to the input size together. Evaluation takes
the backbone's center crop (input/resize ratio) and resizes it with antialiasing, which matches
`transforms.eval_transform` up to the order of resize and crop.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F

from . import cache
from .backbones import Preprocessing
from .data import DatasetIndex
from .pixels import to_rgb

# Bump when the stored pixels would change (resize method, crop rule), so old arrays are never reused.
STORE_VERSION = "1"
# torchvision's RandomResizedCrop aspect-ratio range.
ASPECT_RATIOS = (3 / 4, 4 / 3)


def store_folder(cache_root: Path, download_key: str, stored_size: int) -> Path:
    """Where the uint8 arrays for one dataset (by its download key) and size live."""
    return Path(cache_root) / "images" / f"{download_key[:16]}-{stored_size}px-v{STORE_VERSION}"


def _load_square(path: Path, stored_size: int) -> numpy.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = to_rgb(image)
        width, height = image.size
        scale = stored_size / min(width, height)
        size = (max(stored_size, round(width * scale)), max(stored_size, round(height * scale)))
        # Bicubic with PIL's antialiasing filter, like torchvision's Resize on PIL images.
        image = image.resize(size, Image.BICUBIC, reducing_gap=None)
        left, top = (size[0] - stored_size) // 2, (size[1] - stored_size) // 2
        image = image.crop((left, top, left + stored_size, top + stored_size))
        return numpy.asarray(image, dtype=numpy.uint8).transpose(2, 0, 1)


def load_split(
    index: DatasetIndex, split: str, stored_size: int, folder: Path, log: Callable[[str], None] = print
) -> torch.Tensor:
    """uint8 tensor [N, 3, stored_size, stored_size] of one split, decoded once and cached on disk."""
    path = Path(folder) / f"{split}.npy"
    expected = [int(image_id) for image_id in index.image_ids[split]]
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            # The digest recorded when the array was written: a damaged array is decoded again, never used.
            if meta.get("image_ids") == expected and meta.get("sha256") == cache.file_digest(path):
                return torch.from_numpy(numpy.load(path))
            if meta.get("image_ids") == expected:
                log(f"[images] {path} is damaged or unverified (sha256 differs from the one recorded); decoding again")
        except (OSError, ValueError):
            pass  # unreadable or torn: rebuild below
    paths = index.paths(split)
    log(f"[images] decoding {len(paths)} {split} images once into a {stored_size} px uint8 cache ({folder})")
    array = numpy.empty((len(paths), 3, stored_size, stored_size), dtype=numpy.uint8)
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for position, pixels in enumerate(pool.map(lambda item: _load_square(item, stored_size), paths)):
            array[position] = pixels
    with cache.atomic_path(path) as temporary:
        numpy.save(temporary, array)
    cache.write_json_atomic(
        meta_path,
        {"split": split, "stored_size": stored_size, "image_ids": expected, "sha256": cache.file_digest(path)},
    )
    return torch.from_numpy(array)


@dataclass
class ImageSet:
    """One split held in memory as uint8, turned into normalised float batches on demand."""

    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    preprocessing: Preprocessing
    input_size: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.preprocessing, self.input_size)

    def subset(self, choose: Callable) -> ImageSet:
        """The images `choose` (labels as numpy -> row indices) keeps, in that order."""
        rows = torch.as_tensor(choose(self.labels.cpu().numpy()), dtype=torch.int64)
        return ImageSet(self.images[rows], self.labels[rows], self.preprocessing, self.input_size)

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.preprocessing.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=batch.device).view(1, 3, 1, 1)
        return (batch / 255.0 - mean) / std

    def eval_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Center crop of the backbone's eval recipe (crop/resize ratio), resized to the input size."""
        images = self.images[positions].float()
        side = images.shape[-1]
        crop = max(1, round(side * self.preprocessing.input_size / self.preprocessing.resize_size))
        start = (side - crop) // 2
        images = images[..., start : start + crop, start : start + crop]
        if crop != self.input_size:
            images = F.interpolate(
                images,
                size=(self.input_size, self.input_size),
                mode=self.preprocessing.interpolation,
                align_corners=False,
                antialias=True,
            )
        return self._normalise(images.clamp(0, 255))

    def train_batch(
        self, positions: torch.Tensor, augmentation: str, minimum_scale: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Augmented batch: optional policy per image, then batched random-resized-crop + flip + resize."""
        if augmentation == "none":
            return self.eval_batch(positions)
        images = self.images[positions]
        if augmentation in ("trivialaugment", "randaugment"):
            images = apply_policy(images, augmentation, self.preprocessing.interpolation)
        count = images.shape[0]
        if augmentation == "flip":
            base = self.eval_batch(positions)
            flips = torch.rand(count, generator=generator) < 0.5
            return torch.where(flips.view(-1, 1, 1, 1).to(base.device), base.flip(-1), base)
        theta = random_crop_affines(count, minimum_scale, generator).to(images.device)
        grid = F.affine_grid(theta, [count, 3, self.input_size, self.input_size], align_corners=False)
        mode = "bicubic" if self.preprocessing.interpolation == "bicubic" else "bilinear"
        cropped = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        return self._normalise(cropped.clamp(0, 255))

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
) -> dict[str, ImageSet]:
    """train/val/test ImageSets from the uint8 cache in `folder` (built on first use)."""
    return {
        split: ImageSet(
            load_split(index, split, stored_size, folder, log),
            torch.as_tensor(index.labels[split], dtype=torch.int64),
            preprocessing,
            input_size,
        )
        for split in ("train", "val", "test")
    }
