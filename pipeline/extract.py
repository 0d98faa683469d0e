"""Frozen-backbone feature extraction: jobs of images through a frozen model, into the features file.

A `Job` is one group of rows (which images, with which transform); `write_features` batches every job
through one DataLoader or several streams (`in_streams`), runs the model (`features_of`) and hands
the rows to pipeline/features_h5.py, which owns the HDF5 file (layout, resumable blocks, readers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import features_h5
from .features_h5 import FeaturesFileError
from .pixels import TensorPipeline, normalise, read_rgb, uint8_transform  # the one pixel path
from .runtime import Runtime


@dataclass(frozen=True)
class Job:
    """One group of rows to extract: which images, with which transform, and what to record."""

    group: str
    paths: list  # image file per row
    labels: numpy.ndarray  # int64 [N]
    image_ids: numpy.ndarray  # int64 [N]
    views: numpy.ndarray  # int64 [N]; 0 = eval crop
    transform: Callable
    seed: int | None = None  # per-row seeding for random (augmented) transforms
    rows: numpy.ndarray | None = None  # each row's number in the unsharded job (seeds its view); None = own

    def shard(self, rank: int, world: int) -> Job:
        """Rows rank, rank + world, ... of this job (one process's part of a sharded extraction)."""
        rows = numpy.arange(len(self.paths)) if self.rows is None else self.rows
        return dataclasses.replace(
            self,
            paths=self.paths[rank::world],
            labels=self.labels[rank::world],
            image_ids=self.image_ids[rank::world],
            views=self.views[rank::world],
            rows=rows[rank::world],
        )


_SEEDED_DRAWS = threading.Lock()


class ImageDataset(Dataset):
    """Images of one job as transformed tensors; rows with a seed draw their augmentation reproducibly."""

    def __init__(self, job: Job, start: int = 0):
        self.job = job
        self.start = start

    def __len__(self) -> int:
        return len(self.job.paths) - self.start

    def __getitem__(self, position: int) -> torch.Tensor:
        row = self.start + position
        image = read_rgb(self.job.paths[row], tensor=isinstance(self.job.transform, TensorPipeline))
        if self.job.seed is None:
            return self.job.transform(image)
        # Seeded by (seed, row), not by worker, order or shard, so a resumed or sharded run draws identical views.
        if self.job.rows is not None:
            row = int(self.job.rows[row])
        # torch's random generator is one per process: under extraction streams, seeding and drawing must
        # not interleave with another thread's. The transforms draw from the CPU generator only, so seeding
        # it alone gives torch.manual_seed's draws without its per-accelerator seeding, which costs far more
        # than the row's transform on a CUDA build.
        with _SEEDED_DRAWS, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.job.seed * 1_000_003 + row)
            return self.job.transform(image)


_NO_ITEM = object()


def in_streams(function: Callable, items, streams: int):
    """Yield function(item) for each item, in order; with streams > 1, that many threads run items at once.

    Each stream thread gets torch.get_num_threads() // streams compute threads of its own. On a CPU,
    one single-threaded stream per core overlaps one stream's image decoding with another's model
    and leaves no thread waiting at another's barrier, so extraction can outrun one multi-threaded
    model, with bit-identical features. Items are submitted 2 x streams ahead.
    """
    if streams <= 1:
        yield from map(function, items)
        return
    threads = max(1, torch.get_num_threads() // streams)
    remaining = iter(items)
    with ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        pending = deque(pool.submit(function, item) for _, item in zip(range(2 * streams), remaining, strict=False))
        try:
            while pending:
                result = pending.popleft().result()
                following = next(remaining, _NO_ITEM)
                if following is not _NO_ITEM:
                    pending.append(pool.submit(function, following))
                yield result
        finally:
            for future in pending:  # a failure or an early stop: start nothing more
                future.cancel()


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode everywhere: BatchNorm uses and never updates its running statistics."""
    model.requires_grad_(False)
    return model.eval()


def features_of(model: nn.Module, images: torch.Tensor, runtime: Runtime, mean: tuple, std: tuple) -> numpy.ndarray:
    """float32 numpy features of one uint8 [N, H, W, 3] batch through a frozen `model` (call under inference mode)."""
    images = normalise(images.to(runtime.device, non_blocking=True), mean, std)
    if not runtime.channels_last:
        images = images.contiguous()
    with runtime.autocast():
        features = model(images)
    return features.float().cpu().numpy()


def extract_batches(model: nn.Module, loader, runtime: Runtime, mean: tuple, std: tuple):
    """Yield float32 numpy features of uint8 [N, H, W, 3] batches.

    `model` is frozen here, whatever mode it arrives in.
    """
    freeze(model)
    with torch.inference_mode():
        for images in loader:
            yield features_of(model, images, runtime, mean, std)


class JobsDataset(Dataset):
    """The rows of several jobs behind one index, (job number, row) -> uint8 [H, W, 3] image.

    One DataLoader over every group starts its workers once per backbone rather than once per split,
    a start-up cost that weighs on short extractions.
    """

    def __init__(self, jobs: list):
        self.parts = [ImageDataset(job) for job in jobs]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: tuple) -> torch.Tensor:
        job_number, row = index
        return self.parts[job_number][row]


def batch_plan(jobs: list, starts: list, batch_size: int) -> list:
    """Batches of (job number, row) indices from each job's start row on; a batch never spans two jobs."""
    batches = []
    for job_number, (job, start) in enumerate(zip(jobs, starts, strict=True)):
        for first in range(start, len(job.paths), batch_size):
            batches.append([(job_number, row) for row in range(first, min(first + batch_size, len(job.paths)))])
    return batches


def yield_to_compute(worker_id: int) -> None:
    """DataLoader worker start on CPU: lowest scheduling priority, so decoding takes the cores' slack.

    Workers and torch's compute threads share the same cores there, and a worker that pre-empts one
    compute thread stalls the others at their next barrier; this matters for full-size JPEGs, where
    decoding is heavy.
    """
    with contextlib.suppress(OSError):  # not allowed here: run at normal priority
        os.nice(19)


@dataclass(frozen=True)
class ExtractionOptions:
    """How `write_features` runs beyond the Runtime (which brings device, precision, memory format, workers
    and streams). frozen.extraction_options builds it, for the stage and the bench alike."""

    batch_size: int
    log: Callable[[str], None] = print
    progress: bool | None = None  # tqdm bars; None = only on a terminal


def write_features(
    path: Path,
    key: str,
    jobs: list,
    model: nn.Module,
    feature_dim: int,
    runtime: Runtime,
    options: ExtractionOptions,
    attributes: dict | None = None,
) -> dict:
    """Extract every job into the features file at `path` (resuming a matching partial file); returns per-group timings.

    `attributes` are written on the root, the timings added as JSON (pipeline/features_h5.py). With
    runtime.inference_streams > 1 (see `in_streams`) each stream decodes its own batches and
    runtime.num_workers is unused.
    """
    with features_h5.open_for_writing(path, key, options.log) as writer, torch.inference_mode():
        starts = [writer.prepare(job, feature_dim) for job in jobs]
        batches = batch_plan(jobs, starts, options.batch_size)
        results = _batch_features(freeze(model), jobs, batches, runtime)
        with contextlib.closing(results):  # stops the streams on any exit
            writer.write_rows(_labelled(jobs, batches, results, feature_dim, options.progress))
        return writer.complete(attributes or {})


def _batch_features(model: nn.Module, jobs: list, batches: list, runtime: Runtime):
    """Features of each planned batch, in order: runtime.inference_streams batches at once, or one DataLoader's."""
    normalisations = [uint8_transform(job.transform)[1:] for job in jobs]

    def features_of_rows(rows: list, images: torch.Tensor) -> numpy.ndarray:
        return features_of(model, images, runtime, *normalisations[rows[0][0]])

    return decoded_batches(jobs, batches, runtime, features_of_rows)


def decoded_batches(jobs: list, batches: list, runtime: Runtime, then: Callable | None = None):
    """The uint8 [N, H, W, 3] pixels of each planned batch, in order, decoded as `write_features` decodes
    them (runtime.inference_streams streams, each decoding its own batches, or one DataLoader's workers);
    with `then`, then(rows, pixels) of each instead, run where the batch was decoded under streams.
    The bench times the decoding alone through here."""
    pixel_jobs = [dataclasses.replace(job, transform=uint8_transform(job.transform)[0]) for job in jobs]
    dataset = JobsDataset(pixel_jobs)
    if runtime.inference_streams > 1:

        def decode_rows(rows: list):
            with torch.inference_mode():
                images = torch.stack([dataset[row] for row in rows])
                return then(rows, images) if then else images

        return in_streams(decode_rows, batches, runtime.inference_streams)
    # No loader (and no workers started) when a resumed file only lacked its completion mark.
    loader = (
        DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=runtime.num_workers,
            pin_memory=runtime.device.startswith("cuda"),
            worker_init_fn=yield_to_compute if runtime.device == "cpu" else None,
        )
        if batches
        else []
    )
    if then is None:
        return iter(loader)
    return (then(rows, images) for rows, images in zip(batches, loader, strict=True))


def _labelled(jobs: list, batches: list, results, feature_dim: int, progress: bool | None):
    """(group, first row, features) of each batch, for the file's writer, with a progress bar per group."""
    from tqdm import tqdm

    bar, current = None, None
    for rows, batch in zip(batches, results, strict=True):
        job_number, first = rows[0]
        if batch.shape[1] != feature_dim:
            raise FeaturesFileError(
                f"backbone returned {batch.shape[1]} features per image, expected {feature_dim}; is its head stripped?"
            )
        if job_number != current:
            if bar is not None:
                bar.close()
            job = jobs[job_number]
            bar = tqdm(
                total=len(job.paths),
                initial=first,
                desc=f"{job.group:>15}",
                unit="img",
                leave=False,
                disable=None if progress is None else not progress,
                dynamic_ncols=True,
            )
            current = job_number
        yield jobs[job_number].group, first, batch
        bar.update(len(batch))
    if bar is not None:
        bar.close()
