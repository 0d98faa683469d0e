"""[curves] workers: the frozen curve points built in worker processes give what one process gives, under
the same keys, and a worker's failure reaches the caller as the error a sequential build raises."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from helpers import PROJECT, make_tiny_config, stage_arguments

from pipeline import cache, evaluate
from pipeline.errors import CacheError
from pipeline.graph import Graph, get_stage

# One backbone and every head kind: twelve small points, enough to keep two workers busy.
STUDY = ('features.backbones=["tiny-resnet"]', 'heads.kinds=["softmax", "logistic", "knn"]')
# Provenance and clocks: which unit's selection memo a point reused depends on which points had
# finished when it started, and seconds are measured. Every other field must be equal.
PROVENANCE = {
    "selection_reused",
    "selection_from",
    "evaluation_reused",
    "train_seconds",
    "eval_seconds",
    "total_seconds",
    "timings",
}


def config_with(data, cache_root, workers: int, *overrides: str):
    return make_tiny_config(data, cache_root, (*STUDY, f"curves.workers={workers}", *overrides))


def test_workers_enter_no_key(tmp_path, fake_flowers_session):
    one, two = (config_with(fake_flowers_session, tmp_path / "cache", workers) for workers in (1, 2))
    assert [unit.key for unit in Graph(one).units("curves")] == [unit.key for unit in Graph(two).units("curves")]
    assert one.curves.worker_count() == 1 and two.curves.worker_count() == 2
    assert config_with(fake_flowers_session, tmp_path / "cache", 0).curves.worker_count() >= 1


def test_automatic_workers_fit_the_available_memory(tmp_path, monkeypatch):
    from pipeline import config as config_module
    from pipeline.config import WORKER_MEMORY_BYTES, CurvesConfig, available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    3145728 kB\n")
    assert available_memory_bytes(meminfo) == 3 * 2**30
    assert available_memory_bytes(tmp_path / "absent") is None
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    for available, expected in ((None, 64), (2 * WORKER_MEMORY_BYTES + 1, 2), (WORKER_MEMORY_BYTES // 2, 1)):
        monkeypatch.setattr(config_module, "available_memory_bytes", lambda available=available: available)
        assert CurvesConfig(workers=0).worker_count() == expected
    # An explicit count is the user's: no cap.
    assert CurvesConfig(workers=16).worker_count() == 16


def test_only_frozen_points_go_to_workers(tmp_path, fake_flowers_session):
    config = config_with(fake_flowers_session, tmp_path / "cache", 2, "curves.end_to_end=true")
    stage = get_stage("curves")
    assert stage.parallel_workers(config) == 2
    chosen = {unit.name: stage.parallel_unit(unit) for unit in Graph(config).units("curves")}
    assert [name for name, frozen in chosen.items() if not frozen] == [
        name for name in chosen if name.startswith(("scratch-", "finetune-"))
    ]
    assert sum(chosen.values()) == 12


@pytest.fixture(scope="module")
def features_built(tmp_path_factory, fake_flowers_session):
    """A cache root holding the tiny study's features, extracted once for the module."""
    root = tmp_path_factory.mktemp("features")
    Graph(config_with(fake_flowers_session, root, 1), log=lambda line: None).run("features")
    return root


@pytest.fixture
def features_twice(tmp_path, features_built):
    """Two cache roots holding the same features build (copies, so their keys and build ids agree)."""
    roots = tmp_path / "sequential", tmp_path / "workers"
    for root in roots:
        shutil.copytree(features_built, root)
    return roots


@pytest.mark.slow
@pytest.mark.subprocess
def test_workers_build_what_one_process_builds(features_twice, fake_flowers_session):
    import torch

    sequential_root, workers_root = features_twice
    sequential = Graph(config_with(fake_flowers_session, sequential_root, 1), log=lambda line: None)
    # Two torch threads here against one in each worker: the points must not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sequential_manifests = sequential.run("curves")
    finally:
        torch.set_num_threads(threads)
    lines = []
    parallel = Graph(config_with(fake_flowers_session, workers_root, 2), log=lines.append)
    parallel_manifests = parallel.run("curves")
    assert "[curves] building 12 units in 2 worker processes" in lines
    assert sum(line.endswith(": building (no manifest)") for line in lines) == 12  # relayed from the workers
    assert [m["unit"] for m in parallel_manifests] == [m["unit"] for m in sequential_manifests]
    assert [m["key"] for m in parallel_manifests] == [m["key"] for m in sequential_manifests]
    for unit in sequential.units("curves"):
        folders = sequential.directory(unit), parallel.directory(unit)
        results = [json.loads((folder / evaluate.RESULT).read_text()) for folder in folders]
        assert [{k: v for k, v in result.items() if k not in PROVENANCE} for result in results[1:]] == [
            {k: v for k, v in results[0].items() if k not in PROVENANCE}
        ], unit.name
        predictions = [evaluate.read_predictions(folder) for folder in folders]
        for field in ("image_ids", "labels", "predicted"):
            assert numpy.array_equal(getattr(predictions[0], field), getattr(predictions[1], field)), unit.name
    # Valid points are found in this process: no worker starts.
    lines.clear()
    parallel.run("curves")
    assert sum(line.startswith("[curves]") and ": cached (key" in line for line in lines) == 12
    assert not any("worker" in line or "building" in line for line in lines)
    assert sum(line.startswith("[features] tiny-resnet: cached") for line in lines) == 1  # checked once, not per point


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_worker_raises_what_a_sequential_build_raises(features_twice, fake_flowers_session):
    errors = []
    for root, workers in zip(features_twice, (1, 2), strict=True):
        graph = Graph(config_with(fake_flowers_session, root, workers), log=lambda line: None)
        units = graph.units("curves")
        # A file where a point's folder belongs: its build cannot take the unit's lock and stops.
        blocked = graph.directory(units[5])
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("")
        with pytest.raises(CacheError) as raised:
            graph.run("curves")
        errors.append(str(raised.value).replace(str(root), "<cache>"))
        # Every point before it was started before it, and finished: they stay cached.
        assert all(graph.status(unit) is None for unit in units[:5])
    assert errors[1] == errors[0] and "<cache>/curves/tiny-resnet-logistic-n1-seed1" in errors[0]


def children(parent: int) -> list[int]:
    """The processes whose parent is `parent`, from /proc."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(status.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_an_interrupted_or_killed_run_stops_its_workers_and_keeps_finished_points(
    tmp_path, features_built, fake_flowers_session
):
    root = tmp_path / "cache"
    shutil.copytree(features_built, root)
    # Long enough softmax searches that a signal finds points in flight.
    overrides = (*STUDY, "curves.workers=2", "heads.softmax.epochs=1000")
    command = [sys.executable, "-m", "stages.curves", *stage_arguments(fake_flowers_session, root, *overrides)]
    log = tmp_path / "log.txt"
    for stop in (signal.SIGINT, signal.SIGKILL):
        with log.open("w") as output:
            run = subprocess.Popen(command, cwd=PROJECT, stdout=output, stderr=subprocess.STDOUT, text=True)
        assert wait_until(lambda: "[curves] tiny-resnet-softmax-n1-seed1: building" in log.read_text(), 120)
        workers = children(run.pid)
        assert len(workers) >= 2, workers  # the pool (spawn may add a resource tracker)
        run.send_signal(stop)
        returncode = run.wait(timeout=60)
        assert wait_until(lambda pids=workers: not any(running(pid) for pid in pids), 10), log.read_text()
        if stop == signal.SIGINT:
            assert returncode == 130 and "interrupted: finished units stay cached" in log.read_text()
    finished = {folder.name for folder in (root / "curves").iterdir() if cache.read_manifest(folder) is not None}
    rerun = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name in finished:  # nothing a finished point wrote was lost
        assert f"[curves] {name}: cached" in rerun.stdout
    assert sum(": building (" in line for line in rerun.stdout.splitlines()) == 12 - len(finished)
