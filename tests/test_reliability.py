"""Faults on the real stages (tiny config): kills inside writes, full disks, unwritable caches, bad
backbones at the command line and two `make all` at once. Nothing partial may ever be accepted, a
rerun resumes where designed and ends with the numbers of an uninterrupted run.

Kills inside atomic writes use cache's PIPELINE_FAULT test hook; kills inside the HDF5 features
write use tests/fault_driver.py. The reference results come from the concurrency test's two runs.
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
import torch
from helpers import make_tiny_config, one_line_error, stage_arguments

from pipeline import atomic, cache, checkpoints, cli
from pipeline.graph import Graph

PROJECT = Path(__file__).resolve().parents[1]
KILLED = -9
# Every unit of the tiny study, in the order `make all` builds them.
TINY_UNITS = [
    "download/flowers-102",
    "samples/flowers-102",
    "features/tiny-resnet",
    "features/tiny-efficientnet",
    "heads/tiny-resnet-softmax",
    "heads/tiny-resnet-logistic",
    "heads/tiny-efficientnet-softmax",
    "heads/tiny-efficientnet-logistic",
    "finetune/tiny-resnet",
    "cnn/bn-cnn",
    "report/study",
]
# What must equal an uninterrupted run's result.json (timings may differ).
RESULT_FIELDS = (
    "test_top1",
    "test_mean_per_class",
    "val_top1",
    "per_class_accuracy",
    "confusion_matrix",
    "selected",
    "best_epoch",
    "epochs_run",
)


def start(stage: str, data: Path, cache_root: Path, fault: str | None = None, hdf5_write: int | None = None):
    """`python -m stages.<stage>` (or the HDF5 fault driver) as a child process with one planned fault."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    environment.pop(atomic.FAULT_VARIABLE, None)
    if fault:
        environment[atomic.FAULT_VARIABLE] = fault
    if hdf5_write:
        # Blocks of one batch (16 rows), so the kill lands between two blocks of the same split.
        environment.update(FAULT_HDF5_WRITE=str(hdf5_write), FAULT_BLOCK_ROWS="16")
        entry = [sys.executable, "tests/fault_driver.py", stage]
    else:
        entry = [sys.executable, "-m", f"stages.{stage}"]
    return subprocess.Popen(
        entry + stage_arguments(data, cache_root),
        cwd=PROJECT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run(
    stage: str, data: Path, cache_root: Path, fault: str | None = None, hdf5_write: int | None = None, expect: int = 0
) -> str:
    process = start(stage, data, cache_root, fault, hdf5_write)
    log, _ = process.communicate(timeout=300)
    assert process.returncode == expect, f"exit {process.returncode}, expected {expect}:\n{log}"
    return log


def manifest(cache_root: Path, unit: str) -> dict | None:
    return cache.read_manifest(cache_root / unit)


def leftover_temporaries(cache_root: Path) -> list[Path]:
    return list(cache_root.rglob(".*.tmp*"))


def assert_valid(cache_root: Path, unit: str) -> dict:
    """The unit has a manifest and every file it lists; returns the manifest."""
    record = manifest(cache_root, unit)
    assert record is not None, f"{unit} has no manifest"
    for name in record["files"]:
        assert (cache_root / unit / name).is_file(), f"{unit}: {name} listed but missing"
    return record


def close(got, expected, tolerance: float = 1e-6) -> bool:
    """Equal plain data, floats to `tolerance` (nested lists and dicts compared item by item)."""
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(close(got[key], expected[key], tolerance) for key in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(close(a, b, tolerance) for a, b in zip(got, expected, strict=True))
        )
    if isinstance(expected, float) and isinstance(got, (int, float)):
        return abs(got - expected) <= tolerance
    return got == expected


def assert_same_results(cache_root: Path, reference_root: Path, unit: str) -> dict:
    result = json.loads((cache_root / unit / "result.json").read_text())
    expected = json.loads((reference_root / unit / "result.json").read_text())
    for field in RESULT_FIELDS:
        if field in expected:
            assert close(result[field], expected[field]), f"{unit}: {field} differs"
    if "history" in expected:
        assert [row["val_top1"] for row in result["history"]] == [row["val_top1"] for row in expected["history"]]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fake_flowers_session):
    """Two `make all` started together on one empty cache; returns (cache root, their two logs)."""
    cache_root = tmp_path_factory.mktemp("reference") / "cache"
    runs = [start("all", fake_flowers_session, cache_root) for _ in range(2)]
    logs = [process.communicate(timeout=600)[0] for process in runs]
    assert [process.returncode for process in runs] == [0, 0], "\n".join(logs)
    return cache_root, logs


@pytest.fixture
def restore_threads():
    """In-process builds set torch's thread count from [runtime] threads; put it back afterwards."""
    threads = torch.get_num_threads()
    atomic._fault_matches.clear()
    yield
    torch.set_num_threads(threads)


# --- 5. concurrency ---------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_concurrent_make_all_build_each_unit_once(reference):
    cache_root, logs = reference
    log = "".join(logs)
    for unit in TINY_UNITS:
        stage, name = unit.split("/")
        assert log.count(f"[{stage}] {name}: building") == 1, f"{unit} built more or less than once:\n{log}"
        assert_valid(cache_root, unit)
    assert all("all stages valid" in one for one in logs)
    assert leftover_temporaries(cache_root) == []
    assert not list(cache_root.rglob("checkpoint.pt")) and not list(cache_root.rglob("*.partial"))


# --- 1. interruption of the real stages -------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_features_killed_inside_the_hdf5_write_resume_and_match(tmp_path, fake_flowers_session, reference):
    reference_root, _ = reference
    root = tmp_path / "cache"
    unit = root / "features" / "tiny-resnet"
    # Train has 24 rows in batches (and blocks) of 16: die after writing the second block, before it is flushed.
    run("heads", fake_flowers_session, root, hdf5_write=2, expect=KILLED)
    assert manifest(root, "features/tiny-resnet") is None
    assert not (unit / "features.h5").exists() and (unit / "features.h5.partial").is_file()
    # Second kill: inside the first head's file write, after the features finished.
    log = run("heads", fake_flowers_session, root, fault="*/heads/tiny-resnet-softmax/head.pt:kill", expect=KILLED)
    assert "[features] resuming train at row 16 of 24" in log, log
    assert manifest(root, "heads/tiny-resnet-softmax") is None
    assert not (root / "heads" / "tiny-resnet-softmax" / "head.pt").exists()
    assert leftover_temporaries(root), "the kill should have left the head's temporary file"
    # Third kill: inside the manifest write of a features unit (its features.h5 is complete).
    run("heads", fake_flowers_session, root, fault="*/features/tiny-efficientnet/manifest.json:kill", expect=KILLED)
    assert (root / "features" / "tiny-efficientnet" / "features.h5").is_file()
    assert manifest(root, "features/tiny-efficientnet") is None
    log = run("heads", fake_flowers_session, root)
    assert "[features] tiny-resnet: cached" in log and "[features] tiny-efficientnet: building (no manifest)" in log
    for backbone in ("tiny-resnet", "tiny-efficientnet"):
        assert_valid(root, f"features/{backbone}")
        with (
            h5py.File(root / "features" / backbone / "features.h5", "r") as got,
            h5py.File(reference_root / "features" / backbone / "features.h5", "r") as expected,
        ):
            for split in ("train", "val", "test"):
                numpy.testing.assert_allclose(
                    got[split]["features"][:], expected[split]["features"][:], rtol=1e-5, atol=1e-6
                )
                numpy.testing.assert_array_equal(got[split]["image_ids"][:], expected[split]["image_ids"][:])
        for kind in ("softmax", "logistic"):
            assert_valid(root, f"heads/{backbone}-{kind}")
            assert_same_results(root, reference_root, f"heads/{backbone}-{kind}")
    assert leftover_temporaries(root) == [] and not list(root.rglob("*.partial"))


@pytest.mark.subprocess
@pytest.mark.slow
def test_finetune_killed_inside_checkpoint_and_model_writes_resumes_and_matches(
    tmp_path, fake_flowers_session, reference
):
    reference_root, _ = reference
    root = tmp_path / "cache"
    folder = root / "finetune" / "tiny-resnet"
    # Checkpoint writes: 1 = after the linear probe (epoch 0), 2 = epoch 1, 3 = epoch 2: die inside the 3rd.
    run("finetune", fake_flowers_session, root, fault="*/finetune/*/checkpoint.pt:kill:3", expect=KILLED)
    assert manifest(root, "finetune/tiny-resnet") is None and (folder / "checkpoint.pt").is_file()
    assert checkpoints.load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    log = run("finetune", fake_flowers_session, root, fault="*/finetune/*/model.pt:kill", expect=KILLED)
    assert "resuming after epoch 1/3" in log, log
    assert "linear probe" not in log, "the probe is done before epoch 1 and must not be repeated"
    assert not (folder / "model.pt").exists() and manifest(root, "finetune/tiny-resnet") is None
    log = run("finetune", fake_flowers_session, root)
    assert "resuming after epoch 3/3" in log, log
    assert_valid(root, "finetune/tiny-resnet")
    result = assert_same_results(root, reference_root, "finetune/tiny-resnet")
    assert result["resumed_from_epoch"] == 3
    assert not (folder / "checkpoint.pt").exists() and leftover_temporaries(root) == []


@pytest.mark.subprocess
@pytest.mark.slow
def test_cnn_killed_between_epochs_and_inside_the_manifest_write_matches(tmp_path, fake_flowers_session, reference):
    reference_root, _ = reference
    root = tmp_path / "cache"
    folder = root / "cnn" / "bn-cnn"
    # Write 2 is epoch 1's checkpoint: die right after it lands, before epoch 2 starts.
    run("cnn", fake_flowers_session, root, fault="*/cnn/*/checkpoint.pt:kill-after:2", expect=KILLED)
    assert checkpoints.load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    assert manifest(root, "cnn/bn-cnn") is None
    # Everything written, then killed inside the manifest write: the unit must still read as invalid.
    log = run("cnn", fake_flowers_session, root, fault="*/cnn/*/manifest.json:kill", expect=KILLED)
    assert "resuming after epoch 1/3" in log, log
    assert (folder / "result.json").is_file() and manifest(root, "cnn/bn-cnn") is None
    log = run("cnn", fake_flowers_session, root)
    assert "[cnn] bn-cnn: building (no manifest)" in log, log
    assert_valid(root, "cnn/bn-cnn")
    assert_same_results(root, reference_root, "cnn/bn-cnn")
    assert leftover_temporaries(root) == []


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_inside_the_manifest_write_of_a_trained_arm_does_not_lose_the_training(
    tmp_path, fake_flowers_session, reference
):
    """The checkpoint is a resume-only file: the runner deletes it after the manifest, not before."""
    reference_root, _ = reference
    root = tmp_path / "cache"
    run("cnn", fake_flowers_session, root, fault="*/cnn/*/manifest.json:kill", expect=KILLED)
    log = run("cnn", fake_flowers_session, root)
    assert "resuming after epoch 3/3" in log, log
    assert_valid(root, "cnn/bn-cnn")
    assert_same_results(root, reference_root, "cnn/bn-cnn")


# --- 2. full disk and unwritable cache --------------------------------------------------------


def file_bytes(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_full_disk_while_refitting_heads_keeps_earlier_artifacts(
    tmp_path, fake_flowers_session, capsys, monkeypatch, restore_threads
):
    root = tmp_path / "cache"
    arguments = stage_arguments(
        fake_flowers_session, root, 'features.backbones=["tiny-resnet"]', 'heads.kinds=["softmax"]'
    )
    assert cli.run_stage("heads", arguments) == 0
    features_before = file_bytes(root / "features" / "tiny-resnet")
    heads = root / "heads" / "tiny-resnet-softmax"
    heads_before = file_bytes(heads)
    changed = arguments + ["--set", "heads.softmax.epochs=20"]
    # A real ENOSPC inside torch.save, then one at the rename of result.json, then one at the manifest.
    previous = heads_before
    for fault in ("*/head.pt:full", "*/result.json:enospc", "*/heads/*/manifest.json:enospc"):
        capsys.readouterr()
        monkeypatch.setenv(atomic.FAULT_VARIABLE, fault)
        assert cli.run_stage("heads", changed) == 2, fault
        error = one_line_error(capsys)
        written = fault.split(":")[0].rsplit("/", 1)[1]
        assert f"cannot write {heads / written}" in error and "disk is full" in error, error
        assert "free space or point [cache] root at a writable folder" in error
        # Inputs untouched and still valid; the refit unit reads as invalid, never half-valid.
        assert file_bytes(root / "features" / "tiny-resnet") == features_before
        study = Graph(
            make_tiny_config(
                fake_flowers_session, root, ('features.backbones=["tiny-resnet"]', 'heads.kinds=["softmax"]')
            )
        )
        assert study.status(study.unit("features", "tiny-resnet")) is None
        assert cache.read_manifest(heads) is None
        assert leftover_temporaries(root) == []
        # The file whose write failed keeps its earlier content (atomic write).
        now = file_bytes(heads)
        assert now.get(written) == (None if written == cache.MANIFEST else previous[written]), written
        previous = now
    monkeypatch.delenv(atomic.FAULT_VARIABLE)
    assert cli.run_stage("heads", changed) == 0
    assert json.loads((heads / "manifest.json").read_text())["settings"]["softmax_epochs"] == 20


def test_full_disk_inside_a_training_checkpoint_is_one_line(
    tmp_path, fake_flowers_session, capsys, monkeypatch, restore_threads
):
    root = tmp_path / "cache"
    monkeypatch.setenv(atomic.FAULT_VARIABLE, "*/cnn/*/checkpoint.pt:full:2")
    assert cli.run_stage("cnn", stage_arguments(fake_flowers_session, root)) == 2
    error = one_line_error(capsys)
    assert "cannot write" in error and "checkpoint.pt" in error and "disk is full" in error, error
    folder = root / "cnn" / "bn-cnn"
    assert cache.read_manifest(folder) is None
    # The epoch-0 checkpoint before the failed one is intact and resumable.
    assert checkpoints.load_checkpoint(folder / "checkpoint.pt")["epoch"] == 0
    assert leftover_temporaries(root) == []
    assert cache.read_manifest(root / "download" / "flowers-102") is not None


@pytest.mark.parametrize("layout", ["under-a-file", "is-a-file"])
def test_unwritable_cache_root_is_one_line(tmp_path, fake_flowers_session, capsys, layout):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    root = blocker / "cache" if layout == "under-a-file" else blocker
    assert cli.run_stage("download", stage_arguments(fake_flowers_session, root)) == 2
    error = one_line_error(capsys)
    assert "cannot write" in error and str(blocker) in error and "[cache] root" in error, error
    assert blocker.read_text() == "a file where the cache should be"


def test_read_only_file_system_is_one_line(tmp_path, fake_flowers_session, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert cli.run_stage("download", stage_arguments(fake_flowers_session, tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "the file system is read-only" in error and "index.json" in error, error


# --- 4. bad config at the command line, before any work ---------------------------------------


@pytest.mark.parametrize(
    "stage,override",
    [
        ("features", 'features.backbones=["tiny-resnet", "resnet-9000"]'),
        ("finetune", 'finetune.backbones=["resnet-9000"]'),
        ("all", 'finetune.backbones=["resnet-9000"]'),
        ("heads", 'features.backbones=["resnet-9000"]'),
    ],
)
def test_unknown_backbone_fails_before_any_work(tmp_path, fake_flowers_session, capsys, stage, override):
    root = tmp_path / "cache"
    arguments = stage_arguments(fake_flowers_session, root, override)
    code = cli.run_all(arguments) if stage == "all" else cli.run_stage(stage, arguments)
    assert code == 2
    error = one_line_error(capsys)
    assert "unknown backbone 'resnet-9000'" in error and "tiny-resnet" in error and "efficientnet-lite0" in error
    assert not root.exists(), "nothing may be built (not even the download stage) before the config is checked"


@pytest.mark.parametrize(
    "override,named",
    [
        ("features.batch_size=0", "[features] batch_size"),
        ("finetune.epochs=-1", "[finetune] epochs"),
        ('cnn.architecture="vgg"', "[cnn] architecture"),
        ('heads.kinds=["svm"]', "[heads] kinds"),
        ('runtime.device="tpu"', "[runtime] device"),
        ("finetune.epochz=3", "[finetune] epochz"),
    ],
)
def test_bad_settings_at_the_command_line_fail_before_any_work(tmp_path, fake_flowers_session, capsys, override, named):
    root = tmp_path / "cache"
    assert cli.run_all(stage_arguments(fake_flowers_session, root, override)) == 2
    error = one_line_error(capsys)
    assert named in error, error
    assert not root.exists()


# --- damaged leftovers of earlier runs ---------------------------------------------------------


def test_truncated_partial_features_file_is_rebuilt_not_trusted(tmp_path, fake_flowers_session, restore_threads):
    root = tmp_path / "cache"
    arguments = stage_arguments(fake_flowers_session, root, 'features.backbones=["tiny-resnet"]')
    assert cli.run_stage("features", arguments) == 0
    folder = root / "features" / "tiny-resnet"
    with h5py.File(folder / "features.h5", "r") as handle:
        expected = handle["test"]["features"][:]
    # A run that died leaves only half a partial file behind (and no manifest).
    data = (folder / "features.h5").read_bytes()
    (folder / "features.h5").unlink()
    (folder / cache.MANIFEST).unlink()
    (folder / "features.h5.partial").write_bytes(data[: len(data) // 2])
    assert cli.run_stage("features", arguments) == 0
    assert_valid(root, "features/tiny-resnet")
    with h5py.File(folder / "features.h5", "r") as handle:
        numpy.testing.assert_allclose(handle["test"]["features"][:], expected, rtol=1e-5, atol=1e-6)
    assert not (folder / "features.h5.partial").exists()


# In-process itself, but it compares against `reference`: two `make all` subprocesses (~20 s when run alone).
@pytest.mark.subprocess
@pytest.mark.slow
def test_full_disk_mid_training_then_truncated_checkpoint_restarts_and_matches(
    tmp_path, fake_flowers_session, capsys, monkeypatch, restore_threads, reference
):
    reference_root, _ = reference
    root = tmp_path / "cache"
    arguments = stage_arguments(fake_flowers_session, root)
    monkeypatch.setenv(atomic.FAULT_VARIABLE, "*/cnn/*/checkpoint.pt:enospc:3")
    assert cli.run_stage("cnn", arguments) == 2
    one_line_error(capsys)
    folder = root / "cnn" / "bn-cnn"
    assert checkpoints.load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    # The disk is freed, but the checkpoint got damaged meanwhile: it is ignored, never half-loaded.
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    monkeypatch.delenv(atomic.FAULT_VARIABLE)
    assert cli.run_stage("cnn", arguments) == 0
    log = capsys.readouterr().out
    assert "ignoring unreadable checkpoint" in log and "resuming" not in log, log
    assert_valid(root, "cnn/bn-cnn")
    assert_same_results(root, reference_root, "cnn/bn-cnn")
