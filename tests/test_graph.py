"""The stage runner and cache: hits, misses, invalidation, atomic writes, locks and kill -9."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import make_tiny_config, write_fake_flowers

from pipeline import atomic, cache, errors
from pipeline.graph import Graph, StageError
from pipeline.stages.samples import DISTRIBUTION, GRID, SIZES_JSON

PROJECT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def logged(config):
    lines = []
    return Graph(config, log=lines.append), lines


def test_samples_outputs_are_valid_png_and_json(tiny_config):
    graph, lines = logged(tiny_config)
    manifest = graph.run("samples")[0]
    folder = graph.directory(graph.units("samples")[0])
    for name in (GRID, DISTRIBUTION):
        assert (folder / name).read_bytes().startswith(PNG_SIGNATURE)
    sizes = json.loads((folder / SIZES_JSON).read_text())
    assert sizes["splits"] == {"train": 24, "val": 24, "test": 36}
    assert sum(row["total"] for row in sizes["per_class"]) == 84
    assert manifest["files"] and manifest["config"]["samples"]["rows"] == 2
    assert manifest["environment"] == {} or "torch" in manifest["environment"]
    assert any("train       24" in line for line in lines)  # the printed sizes table


def test_second_run_is_all_cache_hits(tiny_config):
    graph, _ = logged(tiny_config)
    graph.run("samples")
    again, lines = logged(tiny_config)
    again.run("samples")
    assert lines == [line for line in lines if ": cached (key" in line] and len(lines) == 2


def test_changed_setting_rebuilds_only_that_stage(tiny_config, tmp_path):
    graph, _ = logged(tiny_config)
    graph.run("samples")
    changed = make_tiny_config(Path(tiny_config.data.root), Path(tiny_config.cache.root), ["samples.rows=1"])
    again, lines = logged(changed)
    again.run("samples")
    assert any(line.startswith("[download] flowers-102: cached") for line in lines)
    assert any(line.startswith("[samples] flowers-102: building (settings changed") for line in lines)


def test_invalidating_an_input_rebuilds_its_dependents(tiny_config):
    graph, _ = logged(tiny_config)
    graph.run("samples")
    assert graph.invalidate("download") == ["flowers-102"]
    again, lines = logged(tiny_config)
    again.run("samples")
    assert "[download] flowers-102: building (no manifest)" in lines
    assert any("[samples] flowers-102: building (input download/flowers-102 was rebuilt)" in line for line in lines)
    with pytest.raises(StageError, match="unknown stage 'sample'; valid stages: download, samples, features, heads"):
        again.invalidate("sample")


def test_other_data_behind_the_same_path_rebuilds(tiny_config):
    graph, _ = logged(tiny_config)
    before = graph.units("download")[0].key
    assert Graph(tiny_config).units("download")[0].key == before  # deterministic
    other = write_fake_flowers(Path(tiny_config.cache.root).parent / "other", seed=1)
    moved = make_tiny_config(other, Path(tiny_config.cache.root))
    assert Graph(moved).units("download")[0].key != before


def test_missing_output_file_invalidates(tiny_config):
    graph, _ = logged(tiny_config)
    graph.run("samples")
    unit = graph.units("samples")[0]
    (graph.directory(unit) / GRID).unlink()
    assert graph.status(unit) == f"output {GRID} is missing"


def test_atomic_write_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "result.json"
    atomic.write_json_atomic(target, {"value": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as temporary:
        temporary.write_text("{partial")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"value": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]


def test_unwritable_folder_gives_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; simulate the failure the OS would report instead
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where a folder should be")
        target = blocked / "out.json"
    else:
        blocked = tmp_path / "blocked"
        blocked.mkdir(mode=0o500)
        target = blocked / "out.json"
    with pytest.raises(errors.CacheError, match="cannot write .*out.json"):
        atomic.write_json_atomic(target, {})


def test_disk_full_is_reported_and_previous_artifact_survives(tmp_path, monkeypatch):
    target = tmp_path / "features.json"
    atomic.write_json_atomic(target, {"ok": True})
    real_fsync = os.fsync

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(errors.CacheError, match="the disk is full"):
        atomic.write_json_atomic(target, {"ok": False})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"ok": True}


def test_lock_makes_a_second_writer_wait(tmp_path):
    folder = tmp_path / "unit"
    order, messages = [], []
    with cache.unit_lock(folder):

        def second():
            with cache.unit_lock(folder, announce=messages.append):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
    assert messages and "locked by pid" in messages[0]


def test_lock_timeout_is_a_clear_error(tmp_path):
    folder = tmp_path / "unit"
    with cache.unit_lock(folder):
        result = {}

        def second():
            try:
                with cache.unit_lock(folder, timeout_seconds=0.3, announce=lambda message: None):
                    pass
            except errors.CacheError as error:
                result["error"] = str(error)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(5)
    assert "still locked" in result["error"]


KILLABLE_STAGE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import make_tiny_config
    from pipeline import atomic
    from pipeline.graph import BuildResult, Graph, Stage, Unit, register_stage

    def plan(config, graph):
        return [Unit(stage="slow", name="only", code_version="1", settings={{}},
                     inputs=(("download", graph.units("download")[0]),))]

    def build(context):
        with atomic.atomic_path(context.directory / "big.bin") as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"x" * 1000)
                handle.flush()
                if {pause}:
                    print("WRITING", flush=True)
                    time.sleep(60)
        return BuildResult(files=["big.bin"])

    register_stage(Stage("slow", "test stage", "1", plan, build))
    config = make_tiny_config({data!r}, {cache_root!r})
    Graph(config).run("slow")
    print("DONE", flush=True)
""")


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_9_mid_write_leaves_nothing_that_reads_as_valid(tiny_config):
    settings = {"tests": str(PROJECT / "tests"), "data": tiny_config.data.root, "cache_root": tiny_config.cache.root}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_STAGE.format(pause=True, **settings)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if "WRITING" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    folder = Path(tiny_config.cache.root) / "slow" / "only"
    assert not (folder / "big.bin").exists()
    assert cache.read_manifest(folder) is None
    finished = subprocess.run(
        [sys.executable, "-c", KILLABLE_STAGE.format(pause=False, **settings)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "DONE" in finished.stdout, finished.stderr
    assert "[slow] only: building (no manifest)" in finished.stdout
    assert (folder / "big.bin").stat().st_size == 1000
    assert not [path.name for path in folder.iterdir() if ".tmp" in path.name]  # the killed run's temp swept
    assert cache.read_manifest(folder)["files"] == ["big.bin"]


def run_cli(*arguments, cwd=PROJECT):
    return subprocess.run([sys.executable, "-m", *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
@pytest.mark.slow
def test_cli_bad_key_and_missing_data_are_one_line_errors(tmp_path):
    bad = run_cli("stages.samples", "--config", "configs/tiny.toml", "--set", "samples.colour=1")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown key [samples] colour; known keys: rows, columns, tile_pixels"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_cli(
        "stages.download",
        "--config",
        "configs/tiny.toml",
        "--data-dir",
        str(empty),
        "--set",
        f'cache.root="{tmp_path / "cache"}"',
    )
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "Flowers-102 not found" in lines[0] and "DATA_DIR=" in lines[0]
