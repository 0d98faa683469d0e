"""Two runs of the same stages at once: each unit is built once, the other run waits and reuses it."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cache

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def test_two_concurrent_runs_build_each_unit_once(tmp_path, fake_flowers_session):
    command = [
        sys.executable,
        "-m",
        "stages.samples",
        "--config",
        "configs/tiny.toml",
        "--data-dir",
        str(fake_flowers_session),
        "--set",
        f'cache.root="{tmp_path / "cache"}"',
    ]
    runs = [
        subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [error for _, error in outputs]
    log = "".join(output for output, _ in outputs)
    for unit in ("[download] flowers-102", "[samples] flowers-102"):
        assert log.count(f"{unit}: building") == 1, log
        assert log.count(f"{unit}: cached") == 1, log
    manifest = cache.read_manifest(tmp_path / "cache" / "samples" / "flowers-102")
    assert manifest is not None and all(
        (tmp_path / "cache" / "samples" / "flowers-102" / name).is_file() for name in manifest["files"]
    )
