"""The report stage on synthetic results: files, self-contained HTML, missing arms, exact numbers, caching.

The arm stages are replaced by stand-ins whose build fails the test, so these tests also prove the
report never trains: it only reads the result.json + manifest.json files written here the way the
runner writes them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy
import pytest

import pipeline.report_render
import pipeline.stages.download
import pipeline.stages.report
import pipeline.stages.samples
from pipeline import cache, cli, evaluate, graph, integrity
from pipeline.graph import Graph, Stage, Unit
from pipeline.report_sections import confused_pairs

PROJECT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = [f"flower {number}" for number in range(6)]
TEST_IMAGES = 90


def arm_units(config) -> dict:
    """What the arm stages plan under the tiny config, written out independently of pipeline.stages.report."""
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
    real = {stage.name: stage for stage in (pipeline.stages.download.STAGE, pipeline.stages.samples.STAGE)}
    registry = dict(real)
    for name in ("heads", "finetune", "cnn"):

        def plan(config, study, stage_name=name):
            return [
                Unit(stage_name, unit, "1", {"section": config.section(stage_name), "unit": unit})
                for unit in arm_units(config)[stage_name]
            ]

        registry[name] = Stage(name, f"stand-in {name}", "1", plan, refuse_build)
    registry["report"] = pipeline.stages.report.STAGE
    monkeypatch.setattr(graph, "_REGISTRY", registry)
    monkeypatch.setattr(graph, "STAGE_MODULES", [])
    return registry


def make_result(arm: str, method: str, backbone: str, head: str, generator) -> tuple[dict, dict]:
    """A synthetic result.json with awkward decimals so rounding in the table is exercised, and its test
    predictions (image ids, labels, predicted classes) of the one test set every arm shares."""
    labels = numpy.arange(TEST_IMAGES) % len(CLASSES)
    wrong = generator.random(TEST_IMAGES) < generator.uniform(0.1, 0.8)
    predicted = numpy.where(wrong, (labels + generator.integers(1, len(CLASSES), TEST_IMAGES)) % len(CLASSES), labels)
    metrics = evaluate.classification_metrics(labels, predicted, num_classes=len(CLASSES))
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
    return record, {"image_ids": numpy.arange(1, TEST_IMAGES + 1), "labels": labels, "predictions": predicted}


def write_arm(study: Graph, stage: str, unit_name: str, record: dict, predictions: dict | None = None) -> dict:
    """Write result.json (and predictions.npz, given them) and then the manifest, as Graph.ensure would
    after a build."""
    unit = study.unit(stage, unit_name)
    directory = study.directory(unit)
    evaluate.write_result(directory, record, **(predictions or {}))
    manifest = {
        "stage": stage,
        "unit": unit_name,
        "key": unit.key,
        "code_version": unit.code_version,
        "settings": unit.settings,
        "build_id": uuid.uuid4().hex,
        "inputs": {},
        "files": [evaluate.RESULT, *([evaluate.PREDICTIONS] if predictions else [])],
        "metrics": {},
        "timings": {},
        "extra": {},
        "environment": {"python": "3.x", "torch": "2.test", "device": "cpu", "torch_threads": 2},
        "config": study.config.to_dict(),
        "config_source": study.config.source,
        "created": "2026-01-01",
    }
    manifest["digests"] = integrity.digests_of(directory, manifest["files"])
    cache.write_manifest(directory, manifest)
    return manifest


def write_study(study: Graph, skip: tuple = (), unpaired: tuple = ()) -> dict:
    """Samples built for real (from the fake images); every arm but `skip` written synthetically, with
    its test predictions unless it is in `unpaired` (an arm built before predictions were saved)."""
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
            records[arm], predictions = make_result(arm, method, backbone, head, generator)
            write_arm(study, stage, name, records[arm], None if arm in unpaired else predictions)
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
    return study.directory(study.unit("report", pipeline.report_render.UNIT))


def parse_page(study: Graph) -> PageParser:
    page = PageParser()
    page.feed((report_directory(study) / pipeline.report_render.HTML).read_text())
    page.close()
    return page


def table_rows(study: Graph, header: str) -> dict:
    """{first cell: {header: cell}} of the report's first table with a column named `header`."""
    table = next(table for table in parse_page(study).tables if header in table[0])
    return {row[0]: dict(zip(table[0], row, strict=True)) for row in table[1:]}


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
    for arm, record in records.items():  # the intervals and paired comparisons results.json holds
        assert record["test_mean_per_class_low"] <= record["test_mean_per_class"] <= record["test_mean_per_class_high"]
        assert set(record["comparisons"]) == set(records) - {arm}
        for other, pair in record["comparisons"].items():
            assert pair["difference"] == pytest.approx(record["test_top1"] - records[other]["test_top1"])
            assert pair["difference"] == -records[other]["comparisons"][arm]["difference"]
            assert pair["low"] <= pair["difference"] <= pair["high"] and 0 < pair["mcnemar_p"] <= 1
            assert pair["images"] == TEST_IMAGES and pair["resolved"] in (True, False)
    with open(directory / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for name in numeric:
                assert float(row[name]) == inputs[row["arm"]][name]
            assert float(row["test_top1_low"]) == records[row["arm"]]["test_top1_low"]
    rows = table_rows(study, "Val top-1 %")
    headers = list(next(iter(rows.values())))
    markdown = (directory / "report.md").read_text()
    comparison = table_rows(study, "Test top-1 % [95% interval]")
    for arm, expected in inputs.items():
        low, high = records[arm]["test_top1_low"], records[arm]["test_top1_high"]
        assert low <= expected["test_top1"] <= high
        cell = f"{100 * expected['test_top1']:.2f} [{100 * low:.2f}, {100 * high:.2f}]"
        assert comparison[arm]["Test top-1 % [95% interval]"] == cell
        assert comparison[arm]["Total s"] == f"{expected['total_seconds']:.1f}"
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
    for source in page.images:  # every picture the page shows is there and decodes to a non-empty image
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        png = base64.b64decode(source[len(prefix) :], validate=True)
        assert png.startswith(PNG_SIGNATURE)
        assert min(_image_size(png)) > 0
    markdown = (report_directory(study) / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == pngs
    for name in linked:  # and every picture the Markdown links to is a non-empty image beside it
        assert min(_image_size((report_directory(study) / name).read_bytes())) > 0


def _image_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.size


# Conservative widths of the HTML's table text (0.9em of a 16 px sans-serif) and of a cell's padding and
# border, and the room inside a 1400 px window (the page's margins taken off).
CHARACTER_PIXELS, CELL_PIXELS, WINDOW_PIXELS = 8, 18, 1400 - 64


def narrowest_width(table: list[list[str]]) -> int:
    """Pixels a table needs at least: a browser wraps cells at spaces, except the first column (nowrap)."""
    width = 0
    for column in range(len(table[0])):
        cells = [row[column] for row in table]
        words = [len(cell) if column == 0 else max(map(len, cell.split() or [""])) for cell in cells]
        width += CHARACTER_PIXELS * max(words) + CELL_PIXELS
    return width


@pytest.mark.slow
def test_every_table_fits_a_1400_pixel_window_and_the_comparison_is_short(tiny_config, stand_in_stages):
    study = Graph(tiny_config, log=lambda message: None)
    write_study(study)
    study.run("report")
    tables = parse_page(study).tables
    assert tables[0][0] == ["Arm", "Test top-1 % [95% interval]", "Test mean per-class % [95% interval]", "Total s"]
    for table in tables:
        assert narrowest_width(table) <= WINDOW_PIXELS, table[0]
    # The old single comparison table (18 columns) needed more than the window: the check can fail.
    old = [["frozen-tiny-efficientnet-logistic", *(["12345.6"] * 17)]]
    assert narrowest_width(old) > WINDOW_PIXELS


@pytest.mark.slow
def test_report_renders_arms_without_predictions_as_n_a(tiny_config, stand_in_stages):
    study = Graph(tiny_config, log=lambda message: None)
    inputs = write_study(study, unpaired=("finetune-tiny-resnet",))
    study.run("report")
    directory = report_directory(study)
    records = {record["arm"]: record for record in json.loads((directory / "results.json").read_text())}
    unpaired = records["finetune-tiny-resnet"]
    assert unpaired["test_top1"] == inputs["finetune-tiny-resnet"]["test_top1"]
    assert unpaired["test_top1_low"] is None and unpaired["comparisons"] == {}
    assert all("finetune-tiny-resnet" not in record["comparisons"] for record in records.values())
    comparison = table_rows(study, "Total s")["finetune-tiny-resnet"]
    assert comparison["Test top-1 % [95% interval]"] == f"{100 * unpaired['test_top1']:.2f} [n/a]"
    markdown = (directory / "report.md").read_text()
    assert "finetune-tiny-resnet: built before per-image predictions were saved" in markdown
    sentence = next(line for line in markdown.splitlines() if line.startswith("- Fine-tuning against the frozen"))
    assert "paired interval and McNemar test n/a" in sentence
    # No arm with predictions at all: still a report, every interval n/a, no matrix.
    for stage, units in arm_units(study.config).items():
        for name in units:
            manifest = cache.read_manifest(study.directory(study.unit(stage, name)))
            if evaluate.PREDICTIONS in manifest["files"]:
                record = json.loads((study.directory(study.unit(stage, name)) / evaluate.RESULT).read_text())
                write_arm(study, stage, name, record)
    Graph(tiny_config, log=lambda message: None).run("report")  # a new plan sees the rebuilt arms
    records = json.loads((directory / "results.json").read_text())
    assert all(record["test_top1_low"] is None and record["comparisons"] == {} for record in records)
    markdown = (directory / "report.md").read_text()
    assert "Matrices n/a: fewer than two arms have per-image test predictions." in markdown
    assert "interval n/a: no per-image predictions" in markdown.split("\n\n")[1]


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
    assert table_rows(study, "Status")["scratch-bn-cnn"]["Status"] == "missing"
    assert table_rows(study, "Val top-1 %")["scratch-bn-cnn"]["Test top-1 %"] == "n/a"
    assert set(table_rows(study, "Total s")["scratch-bn-cnn"].values()) == {"scratch-bn-cnn", "n/a"}
    for text in ((directory / "report.html").read_text(), (directory / "report.md").read_text()):
        assert "frozen-tiny-efficientnet-logistic: no manifest; run make heads" in text
        assert "scratch-bn-cnn: cannot plan stage cnn" in text
    summary = pipeline.report_render.summary(study)
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
    assert table_rows(study, "Val top-1 %")["finetune-tiny-resnet"]["Test top-1 %"] == "98.77"


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
    markdown = (report_directory(study) / "report.md").read_text()
    assert f"# Best arm: {by_val}" in markdown
    answer = markdown.split("\n\n")[1]  # the opening paragraph, generated from the numbers
    assert answer.startswith("Answer: ") and f"Its best arm, {by_val}, reaches" in answer
    # Against each other method's best arm: fine-tuning paired, the rewritten scratch arm without predictions.
    assert answer.count("at this test-set size (90 images)") == 1
    assert "scratch-bn-cnn in test top-1 (paired interval and McNemar test n/a" in answer


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
