"""Frozen-backbone feature extraction into one resumable HDF5 file, and reading it back.

File layout (FORMAT_VERSION 1), one file per backbone + preprocessing:

    /<group>/features   float32 [N, D]  pooled penultimate features (the input of the removed head)
    /<group>/labels     int64   [N]     0-based class labels
    /<group>/image_ids  int64   [N]     official 1-based Flowers-102 image ids
    /<group>/views      int64   [N]     0 = the weights' eval crop, 1..K = augmented view number

`<group>` is train, val and test (eval crop, one row per image, in setid.mat order) and, when
augmented views are asked for, train_augmented (K rows per training image, view-major). Root
attributes: format_version, complete, unit_key, backbone, weights_id, weights_sha256, input_size,
resize_size, preprocessing (JSON), precision, channels_last, device, augmented_views,
view_augmentation, seed, feature_dim, class_names (JSON), model_load_seconds and timings (JSON:
per group seconds, images, images_per_second). Each group also carries rows_done and seconds.

Rows are written in blocks of up to CHUNK_ROWS (one HDF5 chunk, a few batches) into a `.partial`
file that is renamed to its final name only once every group is complete, so a killed extraction
never leaves a file that reads as complete, memory stays flat in the dataset size, and a rerun resumes
after the last flushed block (an error or Ctrl-C flushes the rows already computed first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import cache
from .errors import PipelineError
from .pixels import TensorPipeline, normalise, read_rgb, uint8_transform  # the one pixel path

FORMAT_VERSION = 1
GROUP_FIELDS = ("features", "labels", "image_ids", "views")
# Rows per HDF5 chunk of features, and per block written and flushed: each write, attribute update and
# flush holds the GIL in the main thread while the streams compute, so rows go out in blocks, not per batch.
CHUNK_ROWS = 64


class FeaturesFileError(PipelineError, RuntimeError):
    """A features file that is missing, incomplete or malformed, or an image it is made from that cannot be read."""


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


def features_of(
    model: nn.Module,
    images: torch.Tensor,
    device: str,
    autocast: Callable,
    channels_last: bool,
    mean: tuple,
    std: tuple,
) -> numpy.ndarray:
    """float32 numpy features of one uint8 [N, H, W, 3] batch through a frozen `model` (call under inference mode)."""
    images = normalise(images.to(device, non_blocking=True), mean, std)
    if not channels_last:
        images = images.contiguous()
    with autocast():
        features = model(images)
    return features.float().cpu().numpy()


def extract_batches(
    model: nn.Module, loader, device: str, autocast: Callable, channels_last: bool, mean: tuple, std: tuple
):
    """Yield float32 numpy features of uint8 [N, H, W, 3] batches.

    `model` is frozen here, whatever mode it arrives in.
    """
    freeze(model)
    with torch.inference_mode():
        for images in loader:
            yield features_of(model, images, device, autocast, channels_last, mean, std)


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


def _open_partial(path: Path, key: str):
    """The partial file for this key, reopened to resume, or a fresh one when absent, stale or damaged."""
    import h5py

    cache.require_free_space(path, 0)
    if path.exists():
        try:
            handle = h5py.File(path, "a")
            if handle.attrs.get("unit_key") == key and handle.attrs.get("format_version") == FORMAT_VERSION:
                return handle, True
            handle.close()
        except (OSError, RuntimeError, KeyError):
            pass  # torn by a kill mid-write: start over
        path.unlink()
    handle = h5py.File(path, "w")
    handle.attrs["unit_key"] = key
    handle.attrs["format_version"] = FORMAT_VERSION
    handle.attrs["complete"] = False
    return handle, False


def _prepare_group(handle, job: Job, feature_dim: int, log: Callable[[str], None] = print):
    """The job's group, created with its labels/ids up front, or checked when resuming."""
    if job.group in handle:
        group = handle[job.group]
        if (
            group["features"].shape == (len(job.paths), feature_dim)
            and numpy.array_equal(group["image_ids"][:], job.image_ids)
            and numpy.array_equal(group["views"][:], job.views)
        ):
            if _flushed_rows_intact(group):
                return group
            log(f"[features] {job.group}: the partial file's rows do not match their digests; extracting them again")
        del handle[job.group]
    group = handle.create_group(job.group)
    rows = len(job.paths)
    # One chunk per block of rows keeps partial writes cheap and reads of a whole split contiguous enough.
    group.create_dataset(
        "features", shape=(rows, feature_dim), dtype="float32", chunks=(max(1, min(rows, CHUNK_ROWS)), feature_dim)
    )
    group.create_dataset("labels", data=numpy.asarray(job.labels, dtype=numpy.int64))
    group.create_dataset("image_ids", data=numpy.asarray(job.image_ids, dtype=numpy.int64))
    group.create_dataset("views", data=numpy.asarray(job.views, dtype=numpy.int64))
    # One record per flushed block (first row, rows, sha256 of its float32 bytes): a resumed file's rows
    # are used only when they still hash as written.
    group.create_dataset(BLOCKS, shape=(0,), maxshape=(None,), dtype=BLOCK_RECORD, chunks=(256,))
    group.attrs["rows_done"] = 0
    group.attrs["seconds"] = 0.0
    return group


BLOCKS = "blocks"
BLOCK_RECORD = numpy.dtype([("first", numpy.int64), ("rows", numpy.int64), ("sha256", "S64")])


def _block_digest(rows: numpy.ndarray) -> bytes:
    return hashlib.sha256(numpy.ascontiguousarray(rows, dtype=numpy.float32).tobytes()).hexdigest().encode()


def _flushed_rows_intact(group) -> bool:
    """Whether the rows a partial file says are done are all covered by block records whose digests match."""
    if BLOCKS not in group:
        return False  # written before block records existed: extract the group again
    done, expected_first, kept = int(group.attrs["rows_done"]), 0, 0
    records = group[BLOCKS]
    for first, rows, digest in records[:]:
        if first >= done:
            break  # written, but killed before rows_done moved: those rows are redone
        if first != expected_first or first + rows > done:
            return False
        if _block_digest(group["features"][first : first + rows]) != digest:
            return False
        expected_first, kept = first + rows, kept + 1
    records.resize((kept,))
    return expected_first == done


class _Block:
    """Consecutive rows of one group's features, computed but not yet written to the file."""

    def __init__(self):
        self.group, self.first, self.batches, self.rows = None, 0, [], 0
        self.started = time.perf_counter()

    def add(self, group, first: int, batch: numpy.ndarray) -> None:
        if not self.batches:
            self.group, self.first = group, first
        self.batches.append(batch)
        self.rows += len(batch)

    def write(self, handle) -> None:
        """Write and flush the rows held; what is flushed survives a kill and is not extracted again."""
        if not self.batches:
            return
        batches, rows, self.batches, self.rows = self.batches, self.rows, [], 0  # a failed write is not retried
        cache.require_free_space(handle.filename, sum(batch.nbytes for batch in batches))
        block = numpy.concatenate(batches)
        self.group["features"][self.first : self.first + rows] = block
        records = self.group[BLOCKS]
        records.resize((len(records) + 1,))
        records[-1] = (self.first, rows, _block_digest(block))
        now = time.perf_counter()
        self.group.attrs["rows_done"] = self.first + rows
        self.group.attrs["seconds"] = float(self.group.attrs["seconds"]) + now - self.started
        handle.flush()
        self.started = now


def write_features(path: Path, key: str, jobs: list, model: nn.Module, feature_dim: int, **options) -> dict:
    """Extract every job into `path` (resuming a matching partial file); returns per-group timings.

    `options` are `_write_features`' keywords (device, autocast, channels_last, batch_size,
    num_workers, attributes, log, progress, streams). `attributes` are written on the root; timings
    are added as JSON. The file appears under `path` only once complete (flushed and fsynced first).
    `progress=None` shows tqdm bars only on a terminal. With streams > 1 (see `in_streams`) each
    stream decodes its own batches and `num_workers` is unused.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    # A full disk or an unwritable folder ends in one line; the rows flushed so far stay for a rerun.
    with cache.writing(partial):
        timings = _write_features(partial, key, jobs, model, feature_dim, **options)
    cache.finalize(partial, path)
    return timings


def _write_features(
    partial: Path,
    key: str,
    jobs: list,
    model: nn.Module,
    feature_dim: int,
    *,
    device: str,
    autocast: Callable,
    channels_last: bool,
    batch_size: int,
    num_workers: int,
    attributes: dict,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    streams: int = 1,
) -> dict:
    from tqdm import tqdm

    handle, resumed = _open_partial(partial, key)
    try:
        groups, starts, pixel_jobs, normalisations = [], [], [], []
        for job in jobs:
            group = _prepare_group(handle, job, feature_dim, log)
            done = int(group.attrs["rows_done"])
            if resumed and 0 < done < len(job.paths):
                log(f"[features] resuming {job.group} at row {done} of {len(job.paths)}")
            pixels, mean, std = uint8_transform(job.transform)
            groups.append(group)
            starts.append(done)
            pixel_jobs.append(dataclasses.replace(job, transform=pixels))
            normalisations.append((mean, std))
        batches = batch_plan(jobs, starts, batch_size)
        dataset = JobsDataset(pixel_jobs)
        freeze(model)

        def features_of_rows(rows: list) -> numpy.ndarray:
            with torch.inference_mode():
                return features_of(
                    model,
                    torch.stack([dataset[row] for row in rows]),
                    device,
                    autocast,
                    channels_last,
                    *normalisations[rows[0][0]],
                )

        if streams > 1:
            results = in_streams(features_of_rows, batches, streams)
        else:
            # No loader (and no workers started) when a resumed file only lacked its completion mark.
            loader = (
                DataLoader(
                    dataset,
                    batch_sampler=batches,
                    num_workers=num_workers,
                    pin_memory=device.startswith("cuda"),
                    worker_init_fn=yield_to_compute if device == "cpu" else None,
                )
                if batches
                else []
            )
            results = (
                features_of(model, images, device, autocast, channels_last, *normalisations[rows[0][0]])
                for rows, images in zip(batches, loader, strict=True)
            )
        bar, current = None, None
        block = _Block()
        with torch.inference_mode(), contextlib.closing(results):  # closing stops the streams on any exit
            try:
                for rows, batch in zip(batches, results, strict=True):
                    job_number, first = rows[0]
                    if batch.shape[1] != feature_dim:
                        raise FeaturesFileError(
                            f"backbone returned {batch.shape[1]} features per image, "
                            f"expected {feature_dim}; is its head stripped?"
                        )
                    if job_number != current:
                        block.write(handle)
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
                    block.add(groups[job_number], first, batch)
                    if block.rows >= CHUNK_ROWS:
                        block.write(handle)
                    bar.update(len(batch))
            finally:
                block.write(handle)  # rows computed before an error or Ctrl-C are kept for the rerun
        if bar is not None:
            bar.close()
        timings = {}
        for job in jobs:
            group = handle[job.group]
            seconds = float(group.attrs["seconds"])
            timings[job.group] = {
                "seconds": seconds,
                "images": len(job.paths),
                "images_per_second": len(job.paths) / seconds if seconds > 0 else None,
            }
        for name, value in attributes.items():
            handle.attrs[name] = value
        handle.attrs["timings"] = json.dumps(timings)
        handle.attrs["complete"] = True
    except BaseException:
        # After a failed write (a full disk) every object the close flushes fails again and h5py prints
        # each failure; the error that stopped us is reported once, in one line, by the caller.
        with cache.silenced_stderr():
            handle.close()
        raise
    handle.close()
    return timings


def merge_shards(parts: list, path: Path, key: str) -> dict:
    """Merge the files of a sharded extraction (part r holds rows r, r + W, ... of every group) into the one
    file a single process would have written at `path`; returns its per-group timings.

    Rows are copied a block at a time, so memory stays flat; the merged file appears only when complete.
    Timings: a group's seconds are the slowest part's (the parts ran in parallel).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with cache.writing(partial):
        timings = _merge_shards(parts, partial, key)
    cache.finalize(partial, path)
    return timings


def _merge_shards(parts: list, partial: Path, key: str) -> dict:
    import h5py

    handles = [h5py.File(part, "r") for part in parts]
    world = len(handles)
    try:
        for part, handle in zip(parts, handles, strict=True):
            if not handle.attrs.get("complete"):
                raise FeaturesFileError(f"shard {part} is incomplete; rerun `make features` to finish it")
        timings = {}
        with h5py.File(partial, "w") as merged:
            for name, value in handles[0].attrs.items():
                merged.attrs[name] = value
            merged.attrs["unit_key"] = key
            for group_name in handles[0]:
                groups = [handle[group_name] for handle in handles]
                total = sum(len(group["labels"]) for group in groups)
                target = merged.create_group(group_name)
                for field in GROUP_FIELDS:
                    source = groups[0][field]
                    shape = (total, *source.shape[1:])
                    dataset = target.create_dataset(
                        field,
                        shape=shape,
                        dtype=source.dtype,
                        chunks=source.chunks and (max(1, min(total, CHUNK_ROWS)), *shape[1:]),
                    )
                    block = 4096
                    for rank, group in enumerate(groups):
                        rows = len(group[field])
                        for start in range(0, rows, block):
                            stop = min(rows, start + block)
                            # Part row i is row rank + i * world of the whole.
                            dataset[rank + start * world : rank + (stop - 1) * world + 1 : world] = group[field][
                                start:stop
                            ]
                seconds = max(float(group.attrs["seconds"]) for group in groups)
                target.attrs["rows_done"] = total
                target.attrs["seconds"] = seconds
                timings[group_name] = {
                    "seconds": seconds,
                    "images": total,
                    "images_per_second": total / seconds if seconds > 0 else None,
                }
            merged.attrs["timings"] = json.dumps(timings)
            merged.attrs["complete"] = True
    finally:
        for handle in handles:
            handle.close()
    return timings


def read_attributes(path: Path) -> dict:
    """Root attributes of a complete features file, JSON fields decoded."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeaturesFileError(f"features file {path} is missing; run `make features` first")
    with h5py.File(path, "r") as handle:
        attributes = {name: _plain(value) for name, value in handle.attrs.items()}
        groups = list(handle.keys())
    if attributes.get("format_version") != FORMAT_VERSION or not attributes.get("complete"):
        raise FeaturesFileError(
            f"{path} is not a complete features file (format {FORMAT_VERSION}); rerun `make features` to rebuild it"
        )
    for name in ("preprocessing", "timings", "class_names"):
        if isinstance(attributes.get(name), str):
            attributes[name] = json.loads(attributes[name])
    attributes["groups"] = groups
    return attributes


def read_group(path: Path, group: str) -> dict:
    """One group's arrays ({features, labels, image_ids, views}) fully in memory."""
    import h5py

    with h5py.File(path, "r") as handle:
        if group not in handle:
            raise FeaturesFileError(f"{path} has no group {group!r}; it holds {', '.join(handle.keys())}")
        return {name: handle[group][name][:] for name in GROUP_FIELDS}


def _plain(value):
    """h5py attribute values as plain Python (numpy scalars -> int/float/bool, bytes -> str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, numpy.generic):
        return value.item()
    return value
