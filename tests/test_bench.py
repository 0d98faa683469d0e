"""`make bench`: every row lands in bench.json with honest arithmetic, met follows the targets, bad input is one line.

Fake Flowers-102 and the tiny random-init backbones; tiny knobs keep the whole run to seconds. No
timing is asserted: only that the figures are consistent with each other and with the targets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
import pytest
from helpers import PROJECT, make_tiny_config

from pipeline.bench import main, notebook, options, protocol, rows, runner, statistics, subsets, warm
from pipeline.bench.report import FOLDER, PARTIAL, RESULT, format_table

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_KNOBS = options.BenchOptions(
    images=24, rounds=3, finetune_rounds=2, notebook_images=12, notebook_views=2, steps=1, memory_images=24
)
EXPECTED_SECTIONS = {"compute": 3, "extraction": 2, "frozen": 1, "finetune": 1, "warm": 1, "memory": 2}


def study_arguments(config) -> list[str]:
    return [
        "--config",
        str(PROJECT / "configs" / "tiny.toml"),
        "--set",
        f'data.root="{config.data.root}"',
        "--set",
        f'cache.root="{config.cache.root}"',
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory, fake_flowers_session):
    """One full bench run on the tiny study (module-scoped: every test below reads the same run).

    Its memory row runs the features code in fresh python processes, so the tests reading it are
    marked subprocess (and slow: the run takes ~10 s).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = make_tiny_config(fake_flowers_session, tmp_path_factory.mktemp("bench") / "cache")
    lines = []
    try:
        result = runner.run(config, TINY_KNOBS, study_arguments(config), log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return result, config, lines


@pytest.mark.subprocess
@pytest.mark.slow
def test_bench_writes_every_row_atomically_with_environment_and_subsets(report):
    result, config, _ = report
    folder = Path(config.cache.root) / FOLDER
    written = json.loads((folder / RESULT).read_text())
    assert written["complete"] is True and not (folder / PARTIAL).exists()
    assert not list(folder.glob("work-*")), "temporary extraction files must be removed"
    counts = {}
    for row in written["rows"]:
        counts[row["section"]] = counts.get(row["section"], 0) + 1
        assert {"what", "ours", "baseline", "ratio", "target", "met", "notes"} <= set(row)
    assert counts == EXPECTED_SECTIONS
    assert [row["section"] for row in written["rows"]] == sorted(
        (row["section"] for row in written["rows"]), key=options.SECTIONS.index
    )
    assert written["environment"]["device"] == "cpu" and written["environment"]["torch_threads"] >= 1
    assert written["subsets"]["split_sizes"] == {"train": 24, "val": 24, "test": 36}
    assert written["subsets"]["test_images"] == 36 and written["options"]["steps"] == 1


@pytest.mark.subprocess
@pytest.mark.slow
def test_ratio_is_ours_over_baseline_and_met_follows_the_rules(report):
    result, _, _ = report
    for row in result["rows"]:
        if row["section"] == "extraction":
            # Paired rounds: the median of the per-round ratios, each a real extraction over real model-only.
            assert len(row["round_ratios"]) == TINY_KNOBS.rounds and min(row["round_ratios"]) > 0
            assert math.isclose(row["ratio"], float(numpy.median(row["round_ratios"])))
            # Three rounds are too few for a 95% interval of their median: it is their whole range.
            assert row["ratio_interval"] == [min(row["round_ratios"]), max(row["round_ratios"])]
        elif row["section"] == "finetune":
            assert math.isclose(row["ratio"], float(numpy.median(row["round_ratios"])))  # paired rounds too
        elif row["ours"] is not None and row["baseline"]:
            assert math.isclose(row["ratio"], row["ours"] / row["baseline"])
        else:
            assert row["ratio"] is None
        assert row["met"] == rows.rule_met(row)
        if row["section"] == "compute":
            assert row["met"] is None and row["ours"] > 0 and row["target"] is None
    frozen = next(row for row in result["rows"] if row["section"] == "frozen")
    assert frozen["met"] == (frozen["ratio"] <= 1 / 15 and frozen["ours_test_top1"] >= frozen["baseline_test_top1"])
    assert math.isclose(frozen["speedup"], 1 / frozen["ratio"])
    # Ours counts extraction plus every head kind.
    assert frozen["ours"] == pytest.approx(
        frozen["ours_extract_seconds"] + sum(head["seconds"] for head in frozen["ours_heads"].values())
    )
    # The notebook is timed on both sides of ours; its baseline extrapolates the mean of the two slices.
    slices = frozen["notebook_timing_slices"]
    assert len(slices) == 2 and frozen["notebook_timing"]["train_images_timed"] == sum(
        part["train_images_timed"] for part in slices
    )
    per_image = {split: sum(part[f"{split}_seconds_per_image"] for part in slices) / 2 for split in ("train", "val")}
    split_sizes = result["subsets"]["split_sizes"]
    # 25 epochs of train + val, then one test pass over the whole test split at the val loop's speed.
    assert frozen["notebook_training_seconds"] == pytest.approx(
        protocol.NOTEBOOK_EPOCHS * sum(split_sizes[split] * per_image[split] for split in per_image)
    )
    assert frozen["notebook_test_seconds"] == pytest.approx(split_sizes["test"] * per_image["val"])
    assert frozen["baseline"] == pytest.approx(frozen["notebook_training_seconds"] + frozen["notebook_test_seconds"])
    finetune = next(row for row in result["rows"] if row["section"] == "finetune")
    assert finetune["met"] == (finetune["ratio"] <= 0.4)
    # Paired rounds: our step is timed before the notebook's first slice and after each; each round divides
    # the mean of the two timings of ours around a slice by that slice, and the ratio is their median.
    steps, slices = finetune["ours_step_seconds"], finetune["notebook_image_seconds"]
    assert len(steps) == TINY_KNOBS.finetune_rounds + 1 and len(slices) == TINY_KNOBS.finetune_rounds
    assert min(steps) > 0 and min(slices) > 0
    expected = [
        (steps[number] + steps[number + 1]) / 2 / finetune["batch_size"] / slices[number]
        for number in range(len(slices))
    ]
    assert finetune["round_ratios"] == pytest.approx(expected)
    assert finetune["ratio"] == pytest.approx(float(numpy.median(expected)))
    assert finetune["ours"] == pytest.approx(
        finetune["train_images"] * float(numpy.median(steps)) / finetune["batch_size"]
    )
    assert finetune["baseline"] == pytest.approx(finetune["train_images"] * float(numpy.median(slices)))
    for memory in (row for row in result["rows"] if row["section"] == "memory"):
        assert memory["met"] == (memory["ratio"] <= 1.15) and memory["ours"] > 0, memory


@pytest.mark.subprocess
@pytest.mark.slow
def test_warm_row_is_not_measured_while_the_study_is_not_cached(report):
    result, _, _ = report
    warm = next(row for row in result["rows"] if row["section"] == "warm")
    assert warm["ours"] is None and warm["met"] is None
    assert "not measured" in warm["notes"] and "not cached" in warm["notes"]


@pytest.mark.subprocess
def test_warm_row_times_the_study_command_when_nothing_is_pending(tiny_config, monkeypatch):
    # The real study takes a minute to build here; a cheap stage command with the same arguments
    # stands in for `stages.all`, so this checks the measuring and the rule, not the study.
    monkeypatch.setattr(warm, "uncached_units", lambda config: [])
    monkeypatch.setattr(warm, "STUDY_MODULE", "stages.config")
    row = warm.warm_row(tiny_config, study_arguments(tiny_config), timeout=120, log=lambda line: None)
    assert row["ours"] > 0 and row["met"] == (row["ours"] <= 10.0)
    monkeypatch.setattr(warm, "STUDY_MODULE", "stages.no_such_stage")
    failed = warm.warm_row(tiny_config, study_arguments(tiny_config), timeout=120, log=lambda line: None)
    assert failed["ours"] is None and failed["met"] is None and "not measured" in failed["notes"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_printed_table_has_one_line_per_row_and_the_notes(report):
    result, _, _ = report
    table = format_table(result).splitlines()
    assert len([line for line in table if line.startswith("| ") and line[2].isdigit()]) == len(result["rows"])
    assert any(line.startswith(f"{len(result['rows'])}. ") for line in table)


@pytest.mark.parametrize(
    "rule, values, expected",
    [
        ([("ratio", ">=", 0.85)], {"ratio": 0.85}, True),
        ([("ratio", ">=", 0.85)], {"ratio": 0.84}, False),
        ([("ratio", "<=", 0.4)], {"ratio": 0.41}, False),
        ([("ours", "<=", 10.0)], {"ours": 3.9}, True),
        ([("ours", "<=", 10.0)], {"ours": None}, None),
        (
            [("ratio", "<=", 1 / 15), ("ours_test_top1", ">=", "baseline_test_top1")],
            {"ratio": 0.05, "ours_test_top1": 0.70, "baseline_test_top1": 0.71},
            False,
        ),
        (
            [("ratio", "<=", 1 / 15), ("ours_test_top1", ">=", "baseline_test_top1")],
            {"ratio": 0.05, "ours_test_top1": 0.71, "baseline_test_top1": 0.71},
            True,
        ),
        (None, {"ratio": 1.0}, None),
    ],
)
def test_rule_met_on_both_sides_of_each_target(rule, values, expected):
    assert rows.rule_met({"rule": rule, **values}) is expected


@pytest.mark.parametrize(
    "count, ranks", [(1, (1, 1)), (7, (1, 7)), (9, (2, 8)), (15, (4, 12)), (21, (6, 16)), (50, (18, 33))]
)
def test_median_interval_takes_the_order_statistics_that_cover_the_median_95_percent(count, ranks):
    # Shuffled values 1..count: the interval is the (k)th smallest to the (k)th largest, with k the largest
    # rank whose binomial coverage 1 - 2 P(Binomial(count, 1/2) < k) is still >= 95%.
    values = numpy.random.default_rng(count).permutation(numpy.arange(1, count + 1))
    assert statistics.median_interval(values) == ranks
    low, high = ranks
    if count > 1:
        coverage = 1 - 2 * sum(math.comb(count, below) for below in range(low)) / 2**count
        wider = 1 - 2 * sum(math.comb(count, below) for below in range(low + 1)) / 2**count
        assert coverage >= 0.95 > wider or low == 1
    with pytest.raises(ValueError):
        statistics.median_interval([])


def test_make_row_ratio_arithmetic():
    row = rows.make_row("finetune", "x", 20.0, 80.0, "s", "<= 0.4", [("ratio", "<=", 0.4)])
    assert row["ratio"] == 0.25 and row["met"] is True
    assert rows.make_row("warm", "x", None, None, "s", "<= 10 s", [("ours", "<=", 10.0)])["met"] is None


def test_subsets_spread_over_each_split(tiny_config):
    from pipeline.data import load_index
    from pipeline.graph import Graph

    graph = Graph(tiny_config, log=lambda line: None)
    graph.run("download")
    index = load_index(graph.directory(graph.units("download")[0]))
    counts = subsets.proportional_counts(index, 21)
    assert counts == {"train": 6, "val": 6, "test": 9}
    subset = subsets.subset_index(index, counts)
    for split, count in counts.items():
        assert len(subset.image_ids[split]) == count
        assert set(subset.image_ids[split]) <= set(index.image_ids[split])
    # Spread from the first to the last image of a split, not its first few.
    assert subsets.evenly_spaced(24, 6).tolist() == [0, 5, 9, 14, 18, 23]
    assert subsets.proportional_counts(index, 10_000) == {"train": 24, "val": 24, "test": 36}


def test_notebook_head_recipe_learns_separable_features_and_not_shuffled_ones():
    generator = numpy.random.default_rng(0)
    centres = generator.normal(0, 3, (4, 16)).astype(numpy.float32)

    def sample(count, seed):
        labels = numpy.repeat(numpy.arange(4), count)
        noise = numpy.random.default_rng(seed).normal(0, 0.5, (len(labels), 16)).astype(numpy.float32)
        return centres[labels] + noise, labels

    train, val, test = sample(10, 1), sample(10, 2), sample(20, 3)
    views = numpy.stack([train[0], sample(10, 4)[0]])
    learned = notebook.train_notebook_head(views, train[1], val, test, 4, seed=0)
    assert learned["test_top1"] >= 0.95 and 1 <= learned["best_epoch"] <= protocol.NOTEBOOK_EPOCHS
    shuffled = numpy.random.default_rng(5).permutation(train[1])
    assert notebook.train_notebook_head(views, shuffled, val, test, 4, seed=0)["test_top1"] < 0.6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--images", "0"], "argument --images: 0 is too small"),
        (["--images", "16", "--rounds", "3"], "fewer than 8 images to each of --rounds 3"),
        (["--steps", "two"], "argument --steps: 'two' is not a whole number"),
        (["--finetune-rounds", "0"], "argument --finetune-rounds: 0 is too small"),
        (["--rows", "compute,speed"], "names no valid row"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--force"], "--force does not apply to bench"),
    ],
)
def test_bad_flags_give_one_line_errors(flags, message, capsys, tiny_config):
    code = main(study_arguments(tiny_config) + flags)
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and message in error and error.count("\n") == 1


def test_missing_data_gives_the_pipelines_own_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(
        [
            "--config",
            str(PROJECT / "configs" / "tiny.toml"),
            "--data-dir",
            str(missing),
            "--set",
            f'cache.root="{tmp_path / "cache"}"',
            "--rows",
            "compute",
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("error: Flowers-102 not found")


def test_an_interrupted_run_keeps_the_last_bench_json_and_the_rows_measured_so_far(tiny_config, monkeypatch):
    folder = Path(tiny_config.cache.root) / FOLDER
    folder.mkdir(parents=True)
    (folder / RESULT).write_text('{"previous": true}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "memory_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run(
            tiny_config,
            options.BenchOptions(rows=("warm", "memory")),
            study_arguments(tiny_config),
            log=lambda line: None,
        )
    assert json.loads((folder / RESULT).read_text()) == {"previous": True}
    partial = json.loads((folder / PARTIAL).read_text())
    assert partial["complete"] is False and [row["section"] for row in partial["rows"]] == ["warm"]
    assert not list(folder.glob("work-*"))
