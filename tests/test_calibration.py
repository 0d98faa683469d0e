"""precision and engine "auto" on CPU: measured once per machine, workload and options, stored, read back."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_config
from torch import nn

from pipeline import calibration
from pipeline.config import ConfigError, RuntimeConfig
from pipeline.runtime import plan_runtime

FAST = {"bf16": 300.0, "fp32": 100.0}
ONNXRUNTIME_RATE = 50.0


def tiny_workload(cache_root, model: str = "tiny", use: str = "inference") -> calibration.Workload:
    def build(precision: str) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    return calibration.Workload(model, use, 2, 16, True, cache_root, build)


@pytest.fixture
def timings(monkeypatch):
    """Fake rates by option, and a record of every measurement asked for (label, options)."""
    measured = []
    rates = {**FAST, "onnxruntime": ONNXRUNTIME_RATE}

    def fake(workload, options=calibration.CANDIDATES):
        measured.append((workload.label, options))
        return {option: rates[option] for option in options}

    monkeypatch.setattr(calibration, "measure_rates", fake)
    # As on a CPU whose flags say nothing of bf16, so that the decision is measured whatever this one has.
    monkeypatch.setattr(calibration, "native_bf16", lambda: None)
    # onnxruntime is an option only in the tests about it, whether or not this machine has it.
    monkeypatch.setattr(calibration.onnx_engine, "available", lambda: False)
    return rates, measured


def auto_precision(workload, **settings) -> str:
    return plan_runtime(RuntimeConfig(device="cpu", **settings), workload).precision


def test_faster_option_is_chosen_and_read_back_without_measuring(tmp_path, timings):
    rates, measured = timings
    assert auto_precision(tiny_workload(tmp_path)) == "bf16"
    assert len(measured) == 1
    rates.update(bf16=1.0)  # the machine got slower at bf16: the stored decision still wins
    assert auto_precision(tiny_workload(tmp_path)) == "bf16"
    assert len(measured) == 1
    assert auto_precision(tiny_workload(tmp_path, use="training")) == "fp32"  # another workload measures
    assert len(measured) == 2
    [path] = (tmp_path / calibration.FOLDER).iterdir()
    record = json.loads(path.read_text())
    assert record["identity"] == calibration.machine_identity()
    assert record["decisions"]["tiny inference batch 2 16px channels_last"]["rates"] == FAST


def test_cpu_without_bf16_instructions_keeps_fp32_without_measuring(tmp_path, timings, monkeypatch, capsys):
    monkeypatch.setattr(calibration, "native_bf16", lambda: False)
    assert auto_precision(tiny_workload(tmp_path)) == "fp32"
    assert timings[1] == []
    [path] = (tmp_path / calibration.FOLDER).iterdir()
    [decision] = json.loads(path.read_text())["decisions"].values()
    assert decision["rates"] == {} and "emulated" in decision["rule"]
    assert "no bf16 instructions: bf16 is emulated -> fp32 (not measured" in capsys.readouterr().out


def test_native_bf16_reads_the_flags(monkeypatch):
    monkeypatch.setattr(calibration, "_cpuinfo", lambda: ("Zen 2", {"avx2", "fma"}))
    assert calibration.native_bf16() is False
    monkeypatch.setattr(calibration, "_cpuinfo", lambda: ("Sapphire Rapids", {"avx512f", "amx_bf16"}))
    assert calibration.native_bf16() is True
    monkeypatch.setattr(calibration, "_cpuinfo", lambda: ("unknown", None))
    assert calibration.native_bf16() is None


def test_near_tie_keeps_fp32(tmp_path, timings):
    timings[0].update(bf16=102.0)
    assert auto_precision(tiny_workload(tmp_path)) == "fp32"


def test_other_machine_measures_again(tmp_path, timings, monkeypatch):
    _, measured = timings
    auto_precision(tiny_workload(tmp_path))
    identity = calibration.machine_identity()
    monkeypatch.setattr(calibration, "machine_identity", lambda: {**identity, "cpu_model": "Another CPU"})
    auto_precision(tiny_workload(tmp_path))
    assert len(measured) == 2 and len(list((tmp_path / calibration.FOLDER).iterdir())) == 2


def test_explicit_precision_bypasses_calibration(tmp_path, timings):
    # (with onnxruntime installed, an explicit fp32 still weighs torch against it: see below)
    assert auto_precision(tiny_workload(tmp_path), precision="fp32") == "fp32"
    assert auto_precision(tiny_workload(tmp_path), precision="bf16") == "bf16"
    assert timings[1] == [] and not (tmp_path / calibration.FOLDER).exists()


@pytest.mark.parametrize("content", ["{not json", '{"identity": {}, "decisions": {}}', '{"decisions": 3}'])
def test_damaged_file_is_ignored_with_a_note_and_measured_again(tmp_path, timings, capsys, content):
    path = calibration.calibration_path(tmp_path, calibration.machine_identity())
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert auto_precision(tiny_workload(tmp_path)) == "bf16"
    notes = [line for line in capsys.readouterr().out.splitlines() if "ignoring damaged" in line]
    assert len(notes) == 1 and str(path) in notes[0]
    assert len(timings[1]) == 1 and "tiny inference" in next(iter(json.loads(path.read_text())["decisions"]))


def choice(workload, **settings) -> tuple[str, str]:
    runtime = plan_runtime(RuntimeConfig(device="cpu", **settings), workload)
    return runtime.precision, runtime.engine


def test_onnxruntime_is_an_option_for_inference_only_and_wins_where_faster(tmp_path, timings, monkeypatch):
    rates, measured = timings
    monkeypatch.setattr(calibration.onnx_engine, "available", lambda: True)
    rates.update(onnxruntime=400.0)
    assert choice(tiny_workload(tmp_path)) == ("fp32", "onnxruntime")
    assert measured[-1][1] == ("bf16", "fp32", "onnxruntime")
    assert choice(tiny_workload(tmp_path, use="training")) == ("bf16", "torch")
    assert measured[-1][1] == ("bf16", "fp32")
    assert choice(tiny_workload(tmp_path)) == ("fp32", "onnxruntime") and len(measured) == 2  # read back
    [path] = (tmp_path / calibration.FOLDER).iterdir()
    decision = json.loads(path.read_text())["decisions"]["tiny inference batch 2 16px channels_last"]
    assert decision["engine"] == "onnxruntime" and decision["options"] == ["bf16", "fp32", "onnxruntime"]
    # A near tie keeps torch; so does an explicit fp32 where onnxruntime is slower.
    rates.update(onnxruntime=310.0)
    assert choice(tiny_workload(tmp_path / "other")) == ("bf16", "torch")
    rates.update(onnxruntime=50.0)
    assert choice(tiny_workload(tmp_path / "third"), precision="fp32") == ("fp32", "torch")
    assert measured[-1][1] == ("fp32", "onnxruntime")


def test_installing_onnxruntime_measures_again_and_a_decision_from_before_it_is_read_back(
    tmp_path, timings, monkeypatch
):
    rates, measured = timings
    path = calibration.calibration_path(tmp_path, calibration.machine_identity())
    path.parent.mkdir(parents=True)
    label = tiny_workload(tmp_path).label
    # A decision stored before engines were an option: no "engine", no "options".
    old = {"precision": "fp32", "rates": {"bf16": 1.0, "fp32": 2.0}}
    path.write_text(json.dumps({"identity": calibration.machine_identity(), "decisions": {label: old}}))
    assert choice(tiny_workload(tmp_path)) == ("fp32", "torch") and measured == []
    monkeypatch.setattr(calibration.onnx_engine, "available", lambda: True)
    rates.update(onnxruntime=400.0)
    assert choice(tiny_workload(tmp_path)) == ("fp32", "onnxruntime") and len(measured) == 1


def test_cpu_without_bf16_weighs_fp32_against_onnxruntime(tmp_path, timings, monkeypatch):
    rates, measured = timings
    monkeypatch.setattr(calibration, "native_bf16", lambda: False)
    monkeypatch.setattr(calibration.onnx_engine, "available", lambda: True)
    rates.update(onnxruntime=150.0)
    assert choice(tiny_workload(tmp_path)) == ("fp32", "onnxruntime")
    assert measured == [(tiny_workload(tmp_path).label, ("fp32", "onnxruntime"))]


def test_engine_set_by_hand(tmp_path, timings, monkeypatch):
    assert choice(tiny_workload(tmp_path), precision="fp32", engine="torch") == ("fp32", "torch")
    assert timings[1] == [] and not (tmp_path / calibration.FOLDER).exists()
    with pytest.raises(ConfigError, match=r"onnxruntime and onnx packages: pip install"):
        choice(tiny_workload(tmp_path), engine="onnxruntime")
    monkeypatch.setattr(calibration.onnx_engine, "available", lambda: True)
    assert choice(tiny_workload(tmp_path), engine="onnxruntime") == ("fp32", "onnxruntime")
    assert timings[1] == []  # one option: nothing timed
    assert choice(tiny_workload(tmp_path, use="training"), engine="onnxruntime") == ("bf16", "torch")
    with pytest.raises(ConfigError, match="computes in fp32"):
        choice(tiny_workload(tmp_path), precision="bf16", engine="onnxruntime")


def test_planning_with_a_stored_decision_writes_nothing(tiny_config, tmp_path, timings):
    from pipeline.graph import Graph

    config = make_tiny_config(tiny_config.data.root, tmp_path / "cache", ['runtime.precision="auto"'])
    Graph(config, log=lambda message: None).units("finetune")  # the first plan measures and stores, once
    measured = len(timings[1])
    assert measured > 0
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*")}
    units = Graph(config, log=lambda message: None).units("finetune")
    assert len(timings[1]) == measured
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*")} == before
    assert all(unit.settings["precision"] == "bf16" for unit in units)


def test_real_measurement_of_a_tiny_model_gives_a_positive_rate(tmp_path):
    for use in ("inference", "training"):
        rates = calibration.measure_rates(tiny_workload(tmp_path, use=use))
        assert set(rates) == set(calibration.CANDIDATES) and min(rates.values()) > 0


def test_cpu_identity_names_the_model_and_only_relevant_flags():
    identity = calibration.cpu_identity()
    assert identity["cpu_model"] and set(identity["cpu_flags"]) <= set(calibration.RELEVANT_FLAGS)


def test_bench_table_names_the_cpu_and_the_decisions_in_force():
    from pipeline.bench.report import format_table
    from pipeline.runtime import environment

    decision = {"precision": "fp32", "rates": {"bf16": 10.0, "fp32": 50.0}}
    report = {"environment": environment(), "calibration": {"lite inference batch 8 224px channels_last": decision}}
    table = format_table({**report, "rows": []})
    header = table.splitlines()[:2]
    assert header[0].startswith(f"CPU: {calibration.cpu_identity()['cpu_model']} (")
    assert header[1].endswith("lite inference batch 8 224px channels_last: fp32 (bf16 10.0 img/s, fp32 50.0 img/s)")
