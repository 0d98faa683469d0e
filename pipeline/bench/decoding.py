"""The decode rows: the pixel path's decoder against other ways to the same eval crop, and streams against
DataLoader workers, measured on the images the bench runs (at full resolution: what real JPEGs cost).

Each decoder variant turns a file into the first [features] backbone's eval crop (its own decode, then
the pixel path's resize and centre crop) on one thread, timed in that thread's CPU seconds, and is
compared with the pixel path: speed,
and how far its crops are from the pixel path's (max and mean absolute difference in uint8 levels).
The variants that decode at a reduced DCT scale (libjpeg-turbo's M/8 scalings, PIL's `draft`) only
apply where the image is larger than the resize; thumbnails decode at full scale whatever the variant.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch

from .. import backbones, frozen, pixels, transforms
from ..config import Config
from ..data import DatasetIndex
from ..runtime import resolve_runtime
from .limit import decode_rate
from .options import BenchOptions
from .rows import make_row
from .subsets import proportional_counts, subset_index

ROUNDS = 3  # passes over the images per variant, interleaved; each variant's median pass counts


def _simplejpeg(data: bytes, shorter: int) -> torch.Tensor:
    """simplejpeg's RGB decode as a [3, H, W] view of its rows, at the smallest of libjpeg-turbo's M/8 DCT
    scales that keeps the shorter side >= `shorter` (full scale when the image is no larger)."""
    import simplejpeg

    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    scale = min(1.0, shorter / min(height, width))
    rows = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=math.ceil(height * scale), min_width=math.ceil(width * scale)
    )
    return torch.from_numpy(rows).permute(2, 0, 1)


def _pil_draft(data: bytes, shorter: int) -> torch.Tensor:
    """PIL's decode with `draft`: the smallest DCT scale (1/2, 1/4, 1/8) that keeps the shorter side >= `shorter`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        scale = min(1.0, shorter / min(image.size))
        image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        return pixels.image_tensor_of(pixels.to_rgb(image.convert("RGB")))


def _torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def variants(resize: int, crop: int) -> dict[str, Callable[[Path], torch.Tensor]]:
    """name -> file to decoded [3, H, W] uint8 image; the first is the pixel path itself."""
    return {
        "pixel path (simplejpeg, full scale)": lambda path: pixels.read_rgb(path, tensor=True),
        f"simplejpeg DCT-scaled, shorter side >= resize {resize}": lambda path: _simplejpeg(path.read_bytes(), resize),
        f"simplejpeg DCT-scaled, shorter side >= crop {crop}": lambda path: _simplejpeg(path.read_bytes(), crop),
        f"PIL with draft (1/2, 1/4, 1/8), shorter side >= resize {resize}": lambda path: _pil_draft(
            path.read_bytes(), resize
        ),
        "torchvision.io.decode_jpeg, full scale": lambda path: _torchvision(path.read_bytes()),
    }


def decode_rows(config: Config, index: DatasetIndex, options: BenchOptions, log: Callable) -> list:
    """A row per decoder variant (img/s against the pixel path's, one thread) and one of streams vs workers."""
    name = config.features.backbones[0]
    spec = backbones.get_backbone(name)
    resize, crop = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    evaluation, _, _ = pixels.eval_pipeline(spec.preprocessing, crop)
    subset = subset_index(index, proportional_counts(index, max(8, options.images // options.rounds)))
    paths = [Path(path) for split in ("train", "val", "test") for path in subset.paths(split)]
    decoders = variants(resize, crop)
    threads = torch.get_num_threads()
    # Per-image cost on one core, as each extraction stream has; in CPU seconds of this thread, which
    # other work on a shared machine changes far less than it changes wall time.
    torch.set_num_threads(1)
    try:
        seconds, crops = {variant: [] for variant in decoders}, {}
        for _ in range(ROUNDS):
            for variant, decode in decoders.items():
                started = time.thread_time()
                crops[variant] = [evaluation(decode(path)) for path in paths]
                seconds[variant].append(time.thread_time() - started)
    finally:
        torch.set_num_threads(threads)
    reference = next(iter(decoders))
    base = len(paths) / float(numpy.median(seconds[reference]))
    rows = []
    for variant in decoders:
        rate = len(paths) / float(numpy.median(seconds[variant]))
        difference = torch.stack(
            [(mine.int() - theirs.int()).abs() for mine, theirs in zip(crops[variant], crops[reference], strict=True)]
        ).float()
        rows.append(
            make_row(
                "decode",
                f"decode + resize + crop to {crop} px ({name}): {variant}",
                rate,
                base,
                "img/s",
                notes=f"{len(paths)} images, one thread, CPU time of that thread (file read included), median of "
                f"{ROUNDS} interleaved passes ({1000 / rate:.2f} ms/img); against the pixel "
                f"path's crops: max |difference| {difference.max():.0f}, mean {difference.mean():.3f} levels; "
                "reference, no target",
                max_difference=float(difference.max()),
                mean_difference=float(difference.mean()),
            )
        )
        log(f"[bench] decode {variant}: {rate:.1f} img/s ({rate / base:.2f} of the pixel path)")
    rows.append(_streams_row(config, subset, spec, crop, log))
    return rows


def _streams_row(config: Config, subset: DatasetIndex, spec, crop: int, log: Callable) -> dict:
    """The pixel path over extraction's jobs on every core: one stream per core (threads) vs DataLoader workers."""
    runtime = resolve_runtime(config.runtime)
    cores = torch.get_num_threads()
    jobs = frozen.extraction_jobs(subset, config, spec, crop)
    streams = dataclasses.replace(runtime, inference_streams=max(2, cores))
    workers = dataclasses.replace(runtime, inference_streams=1, num_workers=max(2, cores))
    rates = {"streams": [], "workers": []}
    for _ in range(ROUNDS):
        rates["streams"].append(decode_rate(jobs, config.features.batch_size, streams))
        rates["workers"].append(decode_rate(jobs, config.features.batch_size, workers))
    ours, base = (float(numpy.median(rates[scheme])) for scheme in ("streams", "workers"))
    log(f"[bench] decode on every core: {ours:.1f} rows/s in streams, {base:.1f} in DataLoader workers")
    return make_row(
        "decode",
        f"pixel path over extraction's jobs ({spec.name}): {streams.inference_streams} streams vs "
        f"{workers.num_workers} DataLoader workers",
        ours,
        base,
        "img/s",
        notes=f"rows/s of extract.decoded_batches alone (no model) over {sum(len(job.paths) for job in jobs)} rows, "
        f"median of {ROUNDS} interleaved passes each (streams {' / '.join(f'{v:.1f}' for v in rates['streams'])}; "
        f"workers {' / '.join(f'{v:.1f}' for v in rates['workers'])}); workers include their start-up, as "
        "extraction's do; reference, no target",
    )
