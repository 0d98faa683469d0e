"""SEEDS=N: one unit per seed for every trained arm, the first seed shared with single-seed runs, and the
report's mean ± sd across seeds."""

from __future__ import annotations

import json
import math

import pytest
from helpers import make_tiny_config

from pipeline import report_render, results
from pipeline.graph import Graph
from pipeline.report_format import summary_rows, text_table

pytestmark = pytest.mark.usefixtures("one_thread")
FROZEN_ONLY = ('features.backbones=["tiny-resnet"]',)


def test_units_per_seed_and_the_first_seed_keeps_the_single_seed_name(tiny_config):
    config = tiny_config.with_seed(0)
    seeded = make_tiny_config(config.data.root, config.cache.root, ("runtime.seeds=3", "runtime.seed=4"))
    graph = Graph(seeded)
    assert seeded.run_seeds() == [4, 5, 6]
    assert [unit.name for unit in graph.units("cnn")] == ["bn-cnn", "bn-cnn-seed5", "bn-cnn-seed6"]
    assert [unit.name for unit in graph.units("finetune")] == ["tiny-resnet", "tiny-resnet-seed5", "tiny-resnet-seed6"]
    heads = [unit for unit in graph.units("heads") if unit.name.startswith("tiny-resnet-softmax")]
    assert [(unit.name, unit.settings["seed"], unit.seed) for unit in heads] == [
        ("tiny-resnet-softmax", 4, 4),
        ("tiny-resnet-softmax-seed5", 5, 5),
        ("tiny-resnet-softmax-seed6", 6, 6),
    ]
    # One features unit per backbone, whatever the number of seeds.
    assert len(graph.units("features")) == 2
    assert len({unit.key for unit in graph.units("cnn")}) == 3
    single = Graph(make_tiny_config(config.data.root, config.cache.root, ("runtime.seed=4",)))
    assert single.units("cnn")[0].key == graph.units("cnn")[0].key


def test_seeds_reuse_the_single_seed_run_and_vary_the_softmax_head(tmp_path, fake_flowers_session):
    cache_root = tmp_path / "cache"
    Graph(make_tiny_config(fake_flowers_session, cache_root, FROZEN_ONLY), log=lambda line: None).run("heads")
    lines = []
    manifests = Graph(
        make_tiny_config(fake_flowers_session, cache_root, FROZEN_ONLY + ("runtime.seeds=3",)), log=lines.append
    ).run("heads")
    assert [manifest["unit"] for manifest in manifests] == [
        "tiny-resnet-softmax",
        "tiny-resnet-softmax-seed1",
        "tiny-resnet-softmax-seed2",
        "tiny-resnet-logistic",
        "tiny-resnet-logistic-seed1",
        "tiny-resnet-logistic-seed2",
    ]
    assert "[heads] tiny-resnet-softmax: cached" in " ".join(lines)
    assert sum("[features] tiny-resnet: building" in line for line in lines) == 0
    written = [
        json.loads((cache_root / "heads" / manifest["unit"] / "result.json").read_text()) for manifest in manifests
    ]
    assert [result["seed"] for result in written] == [0, 1, 2, 0, 1, 2]
    assert [manifest["config"]["runtime"]["seed"] for manifest in manifests] == [0, 1, 2, 0, 1, 2]
    # The seed reaches the softmax head (initialisation and order): its weights differ across seeds.
    import torch

    weights = [
        torch.load(cache_root / "heads" / name / "head.pt", weights_only=True)["state_dict"]["weight"]
        for name in ("tiny-resnet-softmax", "tiny-resnet-softmax-seed1")
    ]
    assert not torch.equal(*weights)


def record(arm, seed, val, test, seconds, status="ok"):
    fields = dict.fromkeys(results.RECORD_FIELDS)
    fields.update(
        arm=arm,
        run=arm if seed == 0 else f"{arm}-seed{seed}",
        seed=seed,
        status=status,
        method="frozen",
        backbone="b",
        head="softmax",
        val_top1=val,
        test_top1=test,
        test_mean_per_class=test,
        train_seconds=seconds,
        total_seconds=seconds,
    )
    if status != "ok":
        fields.update(val_top1=None, test_top1=None, test_mean_per_class=None, train_seconds=None, total_seconds=None)
    return fields


def test_summary_is_mean_and_sample_sd_and_best_arm_uses_the_mean():
    records = [
        record("a", 0, 0.9, 0.70, 10.0),
        record("a", 1, 0.5, 0.72, 12.0),
        record("a", 2, 0.5, 0.74, 14.0),
        record("b", 0, 0.8, 0.60, 1.0),
        record("b", 1, 0.8, 0.62, 3.0),
        record("b", 2, None, None, None, status="missing"),
    ]
    rows = {row["arm"]: row for row in results.summarize(records)}
    assert rows["a"]["runs"] == 3 and rows["b"]["runs"] == 2 and rows["b"]["expected_runs"] == 3
    assert rows["a"]["test_top1_mean"] == pytest.approx(0.72)
    assert rows["a"]["test_top1_sd"] == pytest.approx(0.02)  # sample sd, n - 1
    assert rows["b"]["train_seconds_sd"] == pytest.approx(math.sqrt(2.0))
    assert rows["b"]["seeds"] == [0, 1]
    # "a" has the single best run (0.9) but the lower mean val (0.633 < 0.8): "b" wins.
    best = results.best_arm(records)
    assert best["arm"] == "b" and best["seed"] == 0
    table = {row[0]: row for row in summary_rows(records)}
    assert table["a"][3:5] == ["63.33 ± 23.09", "72.00 ± 2.00"] and table["b"][1] == "2 of 3"
    assert "across seeds (mean ± sd):" in text_table(records)


def test_single_seed_studies_have_no_summary_table():
    records = [record("a", 0, 0.9, 0.70, 10.0), record("b", 0, 0.8, 0.60, 1.0)]
    assert summary_rows(records) == [] and "across seeds" not in text_table(records)
    rows = results.summarize(records)
    assert rows[0]["test_top1_mean"] == 0.70 and rows[0]["test_top1_sd"] is None


@pytest.mark.slow
def test_report_shows_runs_per_seed_and_the_across_seeds_table(tmp_path, fake_flowers_session):
    config = make_tiny_config(
        fake_flowers_session, tmp_path / "cache", FROZEN_ONLY + ("runtime.seeds=2", 'heads.kinds=["softmax"]')
    )
    graph = Graph(config, log=lambda line: None)
    graph.run("heads")
    graph.run("report")
    folder = graph.directory(graph.unit("report", report_render.UNIT))
    records = json.loads((folder / report_render.RESULTS_JSON).read_text())
    frozen = [r for r in records if r["method"] == "frozen"]
    assert [(r["run"], r["seed"], r["status"]) for r in frozen] == [
        ("frozen-tiny-resnet-softmax", 0, "ok"),
        ("frozen-tiny-resnet-softmax-seed1", 1, "ok"),
    ]
    summary = {row["arm"]: row for row in json.loads((folder / report_render.SUMMARY_JSON).read_text())}
    mean = sum(r["test_top1"] for r in frozen) / 2
    assert summary["frozen-tiny-resnet-softmax"]["test_top1_mean"] == pytest.approx(mean)
    assert summary["scratch-bn-cnn"]["runs"] == 0 and summary["scratch-bn-cnn"]["expected_runs"] == 2
    markdown = (folder / report_render.MARKDOWN).read_text()
    assert "## Across seeds" in markdown and "Each arm ran 2 times" in markdown
