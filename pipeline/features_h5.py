"""The features file: its HDF5 layout, the resumable block writer, the shard merge and the readers.

Everything that knows HDF5 lives here; pipeline/extract.py computes the rows and hands them to a
`Writer`. File layout (FORMAT_VERSION 1), one file per backbone + preprocessing:

    /<group>/features   float32 [N, D]  pooled penultimate features (the input of the removed head)
    /<group>/labels     int64   [N]     0-based class labels
    /<group>/image_ids  int64   [N]     official 1-based Flowers-102 image ids
    /<group>/views      int64   [N]     0 = the weights' eval crop, 1..K = augmented view number
    /<group>/blocks     [B] records     (first row, rows, sha256 of their float32 bytes) per flushed block

`<group>` is train, val and test (eval crop, one row per image, in setid.mat order) and, when
augmented views are asked for, train_augmented (K rows per training image, view-major). Root
attributes: format_version, complete, unit_key, backbone, weights_id, weights_sha256,
weights_verified, input_size, resize_size, preprocessing (JSON), precision, channels_last, device,
augmented_views, view_augmentation, seed, feature_dim, fold_batchnorm, class_names (JSON),
model_load_seconds and timings (JSON: per group seconds, images, images_per_second). Each group also
carries rows_done and seconds.

Rows are written in blocks of up to CHUNK_ROWS (one HDF5 chunk, a few batches) into a `.partial`
file that is renamed to its final name (atomic.finalize) only once every group is complete, so a
killed extraction never leaves a file that reads as complete, memory stays flat in the dataset size,
and a rerun resumes after the last flushed block whose sha256 still matches (an error or Ctrl-C
flushes the rows already computed first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy

from . import atomic
from .errors import PipelineError

FEATURES_FILE = "features.h5"  # the file in a features unit's folder
AUGMENTED_GROUP = "train_augmented"
FORMAT_VERSION = 1
GROUP_FIELDS = ("features", "labels", "image_ids", "views")
# Rows per HDF5 chunk of features, and per block written and flushed: each write, attribute update and
# flush holds the GIL in the main thread while the streams compute, so rows go out in blocks, not per batch.
CHUNK_ROWS = 64
BLOCKS = "blocks"
BLOCK_RECORD = numpy.dtype([("first", numpy.int64), ("rows", numpy.int64), ("sha256", "S64")])


class FeaturesFileError(PipelineError, RuntimeError):
    """A features file that is missing, incomplete or malformed, or an image it is made from that cannot be read."""


@contextlib.contextmanager
def _published(path: Path) -> Iterator[Path]:
    """The `.partial` name to write `path` under, renamed to `path` (fsynced) when the block ends without error.

    A full disk or an unwritable folder ends in one line; what was flushed to the partial file stays for a rerun.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with atomic.writing(partial):
        yield partial
    atomic.finalize(partial, path)


@contextlib.contextmanager
def open_for_writing(path: Path, key: str, log: Callable[[str], None] = print) -> Iterator[Writer]:
    """A Writer on `path`'s partial file (resumed when made for the same `key`); `path` appears once it is complete."""
    with _published(path) as partial:
        writer = Writer(partial, key, log)
        try:
            yield writer
        except BaseException:
            # After a failed write (a full disk) every object the close flushes fails again and h5py prints
            # each failure; the error that stopped us is reported once, in one line, by the caller.
            with atomic.silenced_stderr():
                writer.handle.close()
            raise
        writer.handle.close()
        if not writer.completed:
            raise FeaturesFileError(f"{path} was closed before every group was complete; rerun to finish it")


class Writer:
    """One partial features file: its groups, prepared or resumed, filled in flushed blocks, then marked complete."""

    def __init__(self, partial: Path, key: str, log: Callable[[str], None]):
        self.handle, self.resumed = _open_partial(partial, key)
        self.log = log
        self.groups = {}  # group name -> HDF5 group, in the order prepared
        self.completed = False

    def prepare(self, job, feature_dim: int) -> int:
        """Create `job`'s group (an extract.Job: its group name, labels, image_ids and views) or check the
        resumed one; returns how many of its rows are already done."""
        group = _prepare_group(self.handle, job, feature_dim, self.log)
        done = int(group.attrs["rows_done"])
        if self.resumed and 0 < done < len(job.paths):
            self.log(f"[features] resuming {job.group} at row {done} of {len(job.paths)}")
        self.groups[job.group] = group
        return done

    def write_rows(self, batches: Iterable) -> None:
        """Write (group name, first row, float32 [n, D] features) batches in order, in flushed blocks.

        Consecutive rows of one group go out together once they reach CHUNK_ROWS; the rows computed
        before an error or Ctrl-C are written and flushed too, so the rerun does not compute them again.
        """
        block = _Block()
        try:
            for name, first, batch in batches:
                group = self.groups[name]
                if group is not block.group:
                    block.write(self.handle)
                block.add(group, first, batch)
                if block.rows >= CHUNK_ROWS:
                    block.write(self.handle)
        finally:
            block.write(self.handle)

    def complete(self, attributes: dict) -> dict:
        """Write `attributes` and the per-group timings (returned) on the root, and mark the file complete."""
        timings = {
            name: _timing(float(group.attrs["seconds"]), len(group["features"])) for name, group in self.groups.items()
        }
        for name, value in attributes.items():
            self.handle.attrs[name] = value
        self.handle.attrs["timings"] = json.dumps(timings)
        self.handle.attrs["complete"] = True
        self.completed = True
        return timings


def _timing(seconds: float, images: int) -> dict:
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds if seconds > 0 else None}


def _open_partial(path: Path, key: str):
    """The partial file for this key, reopened to resume, or a fresh one when absent, stale or damaged."""
    import h5py

    atomic.require_free_space(path, 0)
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


def _prepare_group(handle, job, feature_dim: int, log: Callable[[str], None] = print):
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
        atomic.require_free_space(handle.filename, sum(batch.nbytes for batch in batches))
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


def merge_shards(parts: list, path: Path, key: str) -> dict:
    """Merge the files of a sharded extraction (part r holds rows r, r + W, ... of every group) into the one
    file a single process would have written at `path`; returns its per-group timings.

    Rows are copied a block at a time, so memory stays flat; the merged file appears only when complete.
    Timings: a group's seconds are the slowest part's (the parts ran in parallel).
    """
    with _published(path) as partial:
        return _merge_shards(parts, partial, key)


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
                timings[group_name] = _timing(seconds, total)
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


def read_group(path: Path, group: str, fields: tuple = GROUP_FIELDS) -> dict:
    """One group's arrays ({features, labels, image_ids, views}, or only `fields`) fully in memory."""
    import h5py

    with h5py.File(path, "r") as handle:
        if group not in handle:
            raise FeaturesFileError(f"{path} has no group {group!r}; it holds {', '.join(handle.keys())}")
        return {name: handle[group][name][:] for name in fields}


def _plain(value):
    """h5py attribute values as plain Python (numpy scalars -> int/float/bool, bytes -> str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, numpy.generic):
        return value.item()
    return value


def features_file(directory: Path) -> Path:
    """The HDF5 file inside a features unit's folder."""
    return Path(directory) / FEATURES_FILE
