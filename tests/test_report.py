"""The report stage on synthetic results: files, self-contained HTML, missing arms, exact numbers, caching.

The arm stages are replaced by stand-ins whose build fails the test, so these tests also prove the
report never trains: it only reads the result.json + manifest.json files written here the way the
runner writes them.
"""

from __future__ import annotations

import base64
import csv
import json
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy
import pytest

import pipeline.download
import pipeline.report
import pipeline.samples
from pipeline import cache, cli, evaluate, graph
from pipeline.graph import Graph, Stage, Unit
from pipeline.report_render import confused_pairs

PROJECT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = [f"flower {number}" for number in range(6)]


def arm_units(config) -> dict:
    """What the arm stages plan under the tiny config, written out independently of pipeline.report."""
    return {
        "heads": [f"{backbone}-{kind}" for backbone in config.features.backbones for kind in config.heads.kinds],
        "finetune": list(config.finetune.backbones),
        "cnn": [config.cnn.architecture],
    }


def refuse_build(context):
    raise AssertionError(f"the report built {context.unit.stage}/{context.unit.name}; it must never train")


@pytest.fixture
def stand_in_stages(monkeypatch):
    """Registry with the real download/samples/report stages and stand-ins for the arm stages."""
    real = {stage.name: stage for stage in (pipeline.download.STAGE, pipeline.samples.STAGE)}
    registry = dict(real)
    for name in ("heads", "finetune", "cnn"):

        def plan(config, study, stage_name=name):
            return [
                Unit(stage_name, unit, "1", {"section": config.section(stage_name), "unit": unit})
                for unit in arm_units(config)[stage_name]
            ]

        registry[name] = Stage(name, f"stand-in {name}", "1", plan, refuse_build)
    registry["report"] = pipeline.report.STAGE
    monkeypatch.setattr(graph, "_REGISTRY", registry)
    monkeypatch.setattr(graph, "STAGE_MODULES", [])
    return registry


def make_result(arm: str, method: str, backbone: str, head: str, generator) -> dict:
    """A synthetic result.json with awkward decimals so rounding in the table is exercised."""
    confusion = generator.integers(0, 4, size=(6, 6)) + numpy.diag(generator.integers(3, 9, size=6))
    metrics = evaluate.classification_metrics(*_labels_from(confusion), num_classes=6)
    record = {
        "arm": arm,
        "method": method,
        "backbone": backbone,
        "head": head,
        "input_size": 32,
        "train_images": 24,
        "fit_on": "train",
        "seed": 0,
        "device": "cpu",
        "test_top1": metrics["top1"],
        "test_mean_per_class": metrics["mean_per_class"],
        "val_top1": float(generator.uniform(0.2, 0.9)),
        "train_seconds": float(generator.uniform(1, 500)),
        "extract_seconds": float(generator.uniform(1, 50)) if method == "frozen" else 0.0,
        "eval_seconds": float(generator.uniform(0.1, 5)),
        "images_per_second": float(generator.uniform(10, 900)),
        "per_class_accuracy": metrics["per_class_accuracy"],
        "confusion_matrix": metrics["confusion_matrix"],
        "class_names": CLASSES,
        "selected": {"weight_decay": 0.001} if method == "frozen" else {"epoch": 3},
    }
    record["total_seconds"] = record["train_seconds"] + record["extract_seconds"] + record["eval_seconds"]
    if method != "frozen":
        record["history"] = [
            {
                "epoch": epoch,
                "train_loss": 2.0 / epoch,
                "train_top1": 0.2 * epoch,
                "val_loss": 2.2 / epoch,
                "val_top1": 0.18 * epoch,
                "lr": 0.01,
                "seconds": 1.5,
                "images_per_second": 16.0,
            }
            for epoch in (1, 2, 3)
        ]
    return record


def _labels_from(confusion):
    labels, predictions = [], []
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            labels += [true] * int(count)
            predictions += [predicted] * int(count)
    return labels, predictions


def write_arm(study: Graph, stage: str, unit_name: str, record: dict) -> dict:
    """Write result.json and then the manifest, as Graph.ensure would after a build."""
    unit = study.unit(stage, unit_name)
    directory = study.directory(unit)
    evaluate.write_result(directory, record)
    manifest = {
        "stage": stage,
        "unit": unit_name,
        "key": unit.key,
        "code_version": unit.code_version,
        "settings": unit.settings,
        "build_id": uuid.uuid4().hex,
        "inputs": {},
        "files": [evaluate.RESULT],
        "metrics": {},
        "timings": {},
        "extra": {},
        "environment": {"python": "3.x", "torch": "2.test", "device": "cpu", "torch_threads": 2},
        "config": study.config.to_dict(),
        "config_source": study.config.source,
        "created": "2026-01-01",
    }
    manifest["digests"] = cache.digests_of(directory, manifest["files"])
    cache.write_manifest(directory, manifest)
    return manifest


def write_study(study: Graph, skip: tuple = ()) -> dict:
    """Samples built for real (from the fake images); every arm but `skip` written synthetically."""
    study.run("samples")
    generator = numpy.random.default_rng(7)
    records = {}
    for stage, units in arm_units(study.config).items():
        for name in units:
            if stage == "heads":
                backbone, kind = name.rsplit("-", 1)
                arm, method, head = f"frozen-{name}", "frozen", kind
            else:
                backbone, head = name, "none"
                method = "finetune" if stage == "finetune" else "scratch"
                arm = f"{method}-{name}"
            if arm in skip:
                continue
            records[arm] = make_result(arm, method, backbone, head, generator)
            write_arm(study, stage, name, records[arm])
    return records


class PageParser(HTMLParser):
    """Collects tables (rows of cell texts), <img> sources and any tag that would load something external."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.external, self._cell = [], [], [], None

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attributes.get("src", ""))
        remote = any(str(attributes.get(name, "")).startswith(("http:", "https:", "//")) for name in ("src", "href"))
        if tag in ("script", "link", "iframe") or remote:
            self.external.append(tag)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def report_directory(study: Graph):
    return study.directory(study.unit("report", pipeline.report.UNIT))


def parse_page(study: Graph) -> PageParser:
    page = PageParser()
    page.feed((report_directory(study) / pipeline.report.HTML).read_text())
    page.close()
    return page


@pytest.mark.slow
def test_every_file_is_written_and_numbers_equal_the_inputs(tiny_config, stand_in_stages):
    study = Graph(tiny_config, log=lambda message: None)
    inputs = write_study(study)
    study.run("report")
    directory = report_directory(study)
    for name in (
        "report.md",
        "report.html",
        "results.csv",
        "results.json",
        "grid.png",
        "class_distribution.png",
        "accuracy_vs_time.png",
        "learning_curves.png",
        "per_class_accuracy.png",
        "confusion_matrix.png",
    ):
        assert (directory / name).is_file(), name
    records = {record["arm"]: record for record in json.loads((directory / "results.json").read_text())}
    assert set(records) == set(inputs)
    numeric = (
        "val_top1",
        "test_top1",
        "test_mean_per_class",
        "extract_seconds",
        "train_seconds",
        "eval_seconds",
        "total_seconds",
        "images_per_second",
    )
    for arm, expected in inputs.items():
        for name in (
            "method",
            "backbone",
            "head",
            "input_size",
            "train_images",
            "fit_on",
            "seed",
            "device",
            "selected",
            *numeric,
        ):
            assert records[arm][name] == expected[name], (arm, name)
        assert records[arm]["status"] == "ok"
    with open(directory / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for name in numeric:
                assert float(row[name]) == inputs[row["arm"]][name]
    table = parse_page(study).tables[0]
    headers = table[0]
    rows = {row[0]: dict(zip(headers, row, strict=True)) for row in table[1:]}
    markdown = (directory / "report.md").read_text()
    for arm, expected in inputs.items():
        row = rows[arm]
        assert row["Test top-1 %"] == f"{100 * expected['test_top1']:.2f}"
        assert abs(float(row["Test top-1 %"]) - 100 * expected["test_top1"]) <= 0.005
        assert abs(float(row["Val top-1 %"]) - 100 * expected["val_top1"]) <= 0.005
        assert abs(float(row["Test mean per-class %"]) - 100 * expected["test_mean_per_class"]) <= 0.005
        for header, name in (
            ("Extract s", "extract_seconds"),
            ("Train s", "train_seconds"),
            ("Eval s", "eval_seconds"),
            ("Total s", "total_seconds"),
            ("Images/s", "images_per_second"),
        ):
            assert abs(float(row[header]) - expected[name]) <= 0.05, (arm, header)
        assert "| " + " | ".join(row[header] for header in headers) + " |" in markdown
    environment = next(table for table in parse_page(study).tables if table[0][:3] == ["Arm", "python", "torch"])
    assert {row[0] for row in environment[1:]} == set(inputs)
    assert all(row[2] == "2.test" for row in environment[1:])


@pytest.mark.slow
def test_html_is_self_contained_and_embeds_every_figure(tiny_config, stand_in_stages):
    study = Graph(tiny_config, log=lambda message: None)
    write_study(study)
    study.run("report")
    page = parse_page(study)
    assert page.external == []
    pngs = sorted(path.name for path in report_directory(study).glob("*.png"))
    assert len(page.images) == len(pngs) == 6
    for source in page.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :], validate=True).startswith(PNG_SIGNATURE)
    markdown = (report_directory(study) / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in markdown


@pytest.mark.slow
def test_missing_arms_are_reported_with_their_reason(tiny_config, stand_in_stages, monkeypatch):
    del stand_in_stages["cnn"]  # a stage that cannot be planned still leaves its arms visible
    study = Graph(tiny_config, log=lambda message: None)
    inputs = write_study(study, skip=("frozen-tiny-efficientnet-logistic", "scratch-bn-cnn"))
    stale = study.directory(study.unit("heads", "tiny-resnet-softmax")) / cache.MANIFEST
    cache.write_manifest(stale.parent, dict(json.loads(stale.read_text()), key="built-under-other-settings"))
    study.run("report")
    directory = report_directory(study)
    records = {record["arm"]: record for record in json.loads((directory / "results.json").read_text())}
    assert len(records) == len(inputs) + 2
    assert records["frozen-tiny-resnet-softmax"]["status"] == "missing"
    assert records["frozen-tiny-resnet-softmax"]["missing_reason"].startswith("settings changed")
    assert records["frozen-tiny-resnet-softmax"]["missing_reason"].endswith("; run make heads")
    assert records["frozen-tiny-efficientnet-logistic"]["status"] == "missing"
    assert records["frozen-tiny-efficientnet-logistic"]["missing_reason"] == "no manifest; run make heads"
    assert records["frozen-tiny-efficientnet-logistic"]["test_top1"] is None
    assert records["scratch-bn-cnn"]["missing_reason"].startswith("cannot plan stage cnn: unknown stage 'cnn'")
    rows = {row[0]: row for row in parse_page(study).tables[0][1:]}
    assert rows["scratch-bn-cnn"][-1] == "missing" and rows["scratch-bn-cnn"][8] == "n/a"
    for text in ((directory / "report.html").read_text(), (directory / "report.md").read_text()):
        assert "frozen-tiny-efficientnet-logistic: no manifest; run make heads" in text
        assert "scratch-bn-cnn: cannot plan stage cnn" in text
    summary = pipeline.report.summary(study)
    assert "missing: scratch-bn-cnn: cannot plan stage cnn" in summary


@pytest.mark.slow
def test_report_is_cached_until_an_arm_is_rebuilt(tiny_config, stand_in_stages):
    messages = []
    study = Graph(tiny_config, log=messages.append)
    inputs = write_study(study)
    first = study.run("report")[0]
    second = Graph(tiny_config, log=messages.append).run("report")[0]
    assert second["build_id"] == first["build_id"]
    assert "cached" in messages[-1]
    changed = dict(inputs["finetune-tiny-resnet"], test_top1=0.987654)
    write_arm(study, "finetune", "tiny-resnet", changed)  # a rebuild: same key, new build id
    third = Graph(tiny_config, log=messages.append).run("report")[0]
    assert third["build_id"] != first["build_id"]
    rows = {row[0]: row for row in parse_page(study).tables[0][1:]}
    assert rows["finetune-tiny-resnet"][8] == "98.77"


@pytest.mark.slow
def test_best_arm_is_chosen_on_val_not_test(tiny_config, stand_in_stages):
    study = Graph(tiny_config, log=lambda message: None)
    inputs = write_study(study)
    # The scratch arm gets the best test score but the worst val score: the report must not pick it.
    inputs["scratch-bn-cnn"] = dict(inputs["scratch-bn-cnn"], test_top1=0.999, val_top1=0.01)
    write_arm(study, "cnn", "bn-cnn", inputs["scratch-bn-cnn"])
    by_val = max(inputs, key=lambda arm: inputs[arm]["val_top1"])
    assert by_val != "scratch-bn-cnn"
    manifest = study.run("report")[0]
    assert manifest["metrics"]["best_arm"] == by_val
    assert f"# Best arm: {by_val}" in (report_directory(study) / "report.md").read_text()


def test_flowers_references_are_left_out_for_other_data(tiny_config, stand_in_stages):
    import dataclasses

    study = Graph(tiny_config, log=lambda message: None)
    write_study(study)
    study.run("report")
    assert "Published targets on full-resolution Flowers-102" in (report_directory(study) / "report.md").read_text()
    # The demo's setting: the report rebuilds (the report section is in its key) without the references.
    other = dataclasses.replace(tiny_config, report=dataclasses.replace(tiny_config.report, flowers_references=False))
    messages = []
    Graph(other, log=messages.append).run("report")
    assert any(message.startswith("[report] study: building") for message in messages)
    markdown = (report_directory(study) / "report.md").read_text()
    assert "References (not our measurements)" not in markdown and "Published targets" not in markdown
    assert "## Data" in markdown


def test_confused_pairs_sum_both_directions_and_rank():
    matrix = [[5, 3, 0], [2, 4, 1], [0, 0, 6]]
    assert confused_pairs(matrix, ["a", "b", "c"], 10) == [(5, "a", "b", 3, 2), (1, "b", "c", 1, 0)]
    assert confused_pairs(matrix, ["a", "b", "c"], 1) == [(5, "a", "b", 3, 2)]


@pytest.mark.slow
def test_make_all_prints_the_table_and_report_path(tiny_config, stand_in_stages, fake_flowers_session, capsys):
    study = Graph(tiny_config, log=lambda message: None)
    inputs = write_study(study)
    code = cli.run_all(
        [
            "--config",
            str(PROJECT / "configs" / "tiny.toml"),
            "--set",
            f'data.root="{fake_flowers_session}"',
            "--set",
            f'cache.root="{study.cache_root}"',
        ]
    )
    output = capsys.readouterr().out
    assert code == 0
    assert f"report: {report_directory(study) / 'report.html'}" in output
    table = output[output.index("val top-1 %") :]
    for arm, record in inputs.items():
        line = next(line for line in table.splitlines() if line.startswith(arm + " "))
        assert f"{100 * record['test_top1']:.2f}" in line.split()
