"""Scale-out under torchrun: 2-process gloo runs on CPU equal the single-process run.

Each test launches the real entry points (`torchrun -m stages.<name>`, as `make <name> NPROC=2` does)
on the fake dataset; processes talk over localhost only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy
import pytest

from pipeline import distributed, extract, features_h5
from pipeline.features_h5 import FEATURES_FILE

PROJECT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")


def launch(
    stage: str, data_root: Path, cache_root: Path, processes: int, *overrides: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    arguments = [
        "-m",
        f"stages.{stage}",
        "--config",
        "configs/tiny.toml",
        "--data-dir",
        str(data_root),
        "--set",
        f'cache.root="{cache_root}"',
        "--set",
        'runtime.precision="fp32"',
    ]
    for override in overrides:
        arguments += ["--set", override]
    command = (
        [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", *arguments]
        if processes > 1
        else [sys.executable, *arguments]
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault is not None:
        environment["PIPELINE_FAULT"] = fault
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300, env=environment)


def succeed(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.slow
def test_sharded_extraction_merges_into_the_single_process_file(tmp_path, fake_flowers_session):
    views = ('features.backbones=["tiny-resnet"]', "features.augmented_views=2")
    succeed(launch("features", fake_flowers_session, tmp_path / "one", 1, *views))
    output = succeed(launch("features", fake_flowers_session, tmp_path / "two", 2, *views))
    assert output.count("[features] tiny-resnet: done") == 1  # rank 0 alone reports
    single, merged = (root / "features" / "tiny-resnet" for root in (tmp_path / "one", tmp_path / "two"))
    assert sorted(path.name for path in merged.iterdir()) == sorted(path.name for path in single.iterdir())
    with h5py.File(single / FEATURES_FILE, "r") as first, h5py.File(merged / FEATURES_FILE, "r") as second:
        assert sorted(first.keys()) == sorted(second.keys()) == ["test", "train", "train_augmented", "val"]
        for group in first:
            for field in features_h5.GROUP_FIELDS:
                numpy.testing.assert_allclose(second[group][field][:], first[group][field][:], rtol=0, atol=1e-5)
        skip = {"timings", "model_load_seconds"}
        assert {name: str(value) for name, value in first.attrs.items() if name not in skip} == {
            name: str(value) for name, value in second.attrs.items() if name not in skip
        }
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["files"] == [FEATURES_FILE]


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_finetune_matches_the_single_process_run(tmp_path, fake_flowers_session):
    # Frozen BatchNorm statistics and an even split: the 2-process gradient is the 1-process one.
    recipe = ('finetune.augmentation="trivialaugment"',)
    succeed(launch("finetune", fake_flowers_session, tmp_path / "one", 1, *recipe))
    output = succeed(launch("finetune", fake_flowers_session, tmp_path / "two", 2, *recipe))
    assert output.count("[finetune] tiny-resnet: done") == 1
    single, parallel = (
        json.loads((root / "finetune" / "tiny-resnet" / "result.json").read_text())
        for root in (tmp_path / "one", tmp_path / "two")
    )
    assert parallel["world_size"] == 2 and single["world_size"] == 1
    for name in ("train_loss", "val_loss", "val_top1", "train_top1"):
        numpy.testing.assert_allclose(
            [row[name] for row in parallel["history"]], [row[name] for row in single["history"]], rtol=1e-4, atol=1e-5
        )
    assert parallel["test_top1"] == single["test_top1"] and parallel["best_epoch"] == single["best_epoch"]
    folder = tmp_path / "two" / "finetune" / "tiny-resnet"
    assert {"model.pt", "history.json", "result.json", "manifest.json"} <= {path.name for path in folder.iterdir()}
    assert not (folder / "checkpoint.pt").exists()


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.slow
def test_killed_ddp_finetune_resumes_and_matches_an_uninterrupted_run(tmp_path, fake_flowers_session):
    # SIGKILL rank 0 right after the epoch-1 checkpoint (its 2nd write: epoch 0 is saved first);
    # torchrun then stops the other rank, as it would on a real crash.
    killed = launch("finetune", fake_flowers_session, tmp_path / "killed", 2, fault="*checkpoint.pt:kill-after:2")
    assert killed.returncode != 0
    output = succeed(launch("finetune", fake_flowers_session, tmp_path / "killed", 2))
    assert "resuming after epoch 1/3" in output
    succeed(launch("finetune", fake_flowers_session, tmp_path / "straight", 2))
    resumed, straight = (
        json.loads((root / "finetune" / "tiny-resnet" / "result.json").read_text())
        for root in (tmp_path / "killed", tmp_path / "straight")
    )
    assert resumed["resumed_from_epoch"] == 1 and straight["resumed_from_epoch"] is None
    numpy.testing.assert_allclose(
        [row["train_loss"] for row in resumed["history"]], [row["train_loss"] for row in straight["history"]], rtol=1e-5
    )
    assert resumed["test_top1"] == straight["test_top1"]


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_cnn_writes_one_complete_result(tmp_path, fake_flowers_session):
    # Training-mode BatchNorm sees each rank's half batch on CPU (gloo has no SyncBatchNorm), so the
    # scratch CNN is close to, not equal to, the single-process run.
    succeed(launch("cnn", fake_flowers_session, tmp_path / "one", 1))
    output = succeed(launch("cnn", fake_flowers_session, tmp_path / "two", 2))
    assert output.count("[cnn] bn-cnn: done") == 1
    single, parallel = (
        json.loads((root / "cnn" / "bn-cnn" / "result.json").read_text())
        for root in (tmp_path / "one", tmp_path / "two")
    )
    assert len(parallel["history"]) == len(single["history"]) == 3
    assert sum(map(sum, parallel["confusion_matrix"])) == 36  # every test image counted once
    numpy.testing.assert_allclose(
        [row["train_loss"] for row in parallel["history"]], [row["train_loss"] for row in single["history"]], rtol=0.1
    )


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.slow
def test_uneven_global_batch_is_a_one_line_error_before_any_work(tmp_path, fake_flowers_session):
    result = launch("cnn", fake_flowers_session, tmp_path / "cache", 2, "cnn.batch_size=7")
    assert result.returncode != 0
    assert "error: [cnn] batch_size 7 is the global batch and must divide evenly over 2 processes" in result.stderr
    assert not (tmp_path / "cache" / "cnn").exists()


def test_job_shards_keep_their_rows_and_merge_back(tmp_path):
    """In-process: strided shards of a job and merge_shards reassemble the exact rows in order."""
    rows, dims, world = 11, 3, 3
    features = numpy.arange(rows * dims, dtype=numpy.float32).reshape(rows, dims)
    job = extract.Job(
        group="train",
        paths=[f"image_{row}.jpg" for row in range(rows)],
        labels=numpy.arange(rows) % 4,
        image_ids=numpy.arange(1, rows + 1),
        views=numpy.zeros(rows, dtype=numpy.int64),
        transform=None,
    )
    parts = []
    for rank in range(world):
        part = job.shard(rank, world)
        assert part.paths == job.paths[rank::world] and list(part.rows) == list(range(rank, rows, world))
        path = tmp_path / f"part{rank}.h5"
        with h5py.File(path, "w") as handle:
            handle.attrs["complete"] = True
            handle.attrs["backbone"] = "test"
            group = handle.create_group("train")
            group["features"] = features[rank::world]
            for field in ("labels", "image_ids", "views"):
                group[field] = getattr(part, field)
            group.attrs["seconds"] = float(rank + 1)
        parts.append(path)
    timings = features_h5.merge_shards(parts, tmp_path / "merged.h5", "the-key")
    with h5py.File(tmp_path / "merged.h5", "r") as merged:
        numpy.testing.assert_array_equal(merged["train"]["features"][:], features)
        numpy.testing.assert_array_equal(merged["train"]["image_ids"][:], job.image_ids)
        assert merged.attrs["unit_key"] == "the-key" and merged.attrs["backbone"] == "test"
    assert timings["train"]["seconds"] == 3.0 and timings["train"]["images"] == rows


def test_single_process_helpers_are_no_ops():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(5) == slice(0, 5, 1) and distributed.broadcast("x") == "x"
    assert distributed.sum_values([1.0, 2.0]) == [1.0, 2.0]
