"""The curves stage: nested class-stratified subsets of train, one cached unit per point, the full-train
point equal to the main arm, the end-to-end switch, and the report with and without curves."""

from __future__ import annotations

import dataclasses
import json

import numpy
import pytest
from helpers import make_tiny_config

from pipeline import cache, evaluate, features_h5, head_kinds, report_sections
from pipeline.config import ConfigError
from pipeline.features_h5 import features_file
from pipeline.graph import Graph
from pipeline.head_kinds import fitting
from pipeline.stages import curves

LOGISTIC_ONLY = ('features.backbones=["tiny-resnet"]', 'heads.kinds=["logistic"]')
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def separable_problem():
    """Three well separated classes in 8 dimensions, the fit rows in a shuffled order."""
    generator = numpy.random.default_rng(3)
    centres = generator.normal(0, 4, (3, 8))

    def rows(count):
        labels = generator.permutation(numpy.repeat(numpy.arange(3), count))
        return (centres[labels] + generator.normal(0, 1.0, (len(labels), 8))).astype(numpy.float32), labels

    return head_kinds.Problem(rows(12), rows(6), 3, ["none"], 0)


def end_to_end_config(session, root, labels_per_class: str, *more: str):
    """The tiny config with end-to-end curves at `labels_per_class` (e.g. "[1,4]"), one seed, and `more`."""
    overrides = ("curves.end_to_end=true", f"curves.labels_per_class={labels_per_class}", "curves.seeds=1", *more)
    return make_tiny_config(session, root, overrides)


def uneven_labels() -> numpy.ndarray:
    """Five classes, one with only three images, in a shuffled order."""
    labels = numpy.concatenate([numpy.repeat(numpy.arange(4), 10), numpy.full(3, 4)])
    return numpy.random.default_rng(7).permutation(labels)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_subsets_are_nested_and_stratified(seed):
    labels = uneven_labels()
    previous = set()
    for per_class in (1, 2, 5, 10):
        rows = curves.subset_rows(labels, per_class, seed)
        assert list(rows) == sorted(set(rows.tolist()))
        counts = numpy.bincount(labels[rows], minlength=5)
        assert counts.tolist() == [min(per_class, 10)] * 4 + [min(per_class, 3)]
        assert previous <= set(rows.tolist())
        previous = set(rows.tolist())
    # At or above every class's count the subset is the whole split, in its own order.
    assert numpy.array_equal(curves.subset_rows(labels, 10, seed), numpy.arange(len(labels)))


def test_subsets_are_deterministic_per_seed_and_differ_across_seeds():
    labels = uneven_labels()
    assert numpy.array_equal(curves.subset_rows(labels, 2, 3), curves.subset_rows(labels, 2, 3))
    draws = {tuple(curves.subset_rows(labels, 2, seed)) for seed in range(5)}
    assert len(draws) == 5
    with pytest.raises(ValueError, match="at least 1"):
        curves.subset_rows(labels, 0, 0)


def test_bad_labels_per_class_is_a_one_line_config_error(tmp_path, fake_flowers_session):
    for value in ("[0, 2]", "[2, 2]", "[]"):
        with pytest.raises(ConfigError, match=r"\[curves\] labels_per_class"):
            make_tiny_config(fake_flowers_session, tmp_path, (f"curves.labels_per_class={value}",))


def test_subset_fit_rows_come_from_train_only_with_their_own_augmented_views(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", (*LOGISTIC_ONLY, "features.augmented_views=2"))
    graph = Graph(config, log=lambda line: None)
    graph.run("features")
    path = features_file(graph.directory(graph.unit("features", "tiny-resnet")))
    ids = {
        split: set(features_h5.read_group(path, split, ("image_ids",))["image_ids"].tolist())
        for split in ("train", "val", "test")
    }
    kept = []
    _, splits = fitting.load_splits(path, True, lambda labels: kept.append(curves.subset_rows(labels, 2, 0)) or kept[0])
    train = features_h5.read_group(path, "train")
    chosen_ids = set(train["image_ids"][kept[0]].tolist())
    assert chosen_ids <= ids["train"] and not chosen_ids & (ids["val"] | ids["test"])
    assert numpy.bincount(splits["train"][1]).tolist() == [2] * 6
    # The fit rows: the 12 chosen images, then their 2 augmented views each (and no other image's views).
    assert len(splits["fit"][1]) == 12 * 3
    augmented = features_h5.read_group(path, "train_augmented")
    views = numpy.isin(augmented["image_ids"], list(chosen_ids))
    assert numpy.array_equal(splits["fit"][0][12:], augmented["features"][views])


def run(config, stage="curves"):
    lines = []
    graph = Graph(config, log=lines.append)
    return graph, graph.run(stage), lines


def test_full_train_point_is_the_main_arm_and_the_stage_caches_and_resumes(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", LOGISTIC_ONLY)
    graph, manifests, _ = run(config, "heads")
    graph, manifests, lines = run(config)
    names = [manifest["unit"] for manifest in manifests]
    assert names == [f"tiny-resnet-logistic-n{n}-seed{seed}" for n in (1, 4) for seed in (0, 1)]
    main = graph.directory(graph.unit("heads", "tiny-resnet-logistic"))
    full = graph.directory(graph.unit("curves", "tiny-resnet-logistic-n4-seed0"))
    main_result, full_result = (json.loads((folder / evaluate.RESULT).read_text()) for folder in (main, full))
    assert full_result["arm"] == main_result["arm"] == "frozen-tiny-resnet-logistic"
    assert full_result["test_top1"] == main_result["test_top1"] and full_result["selected"] == main_result["selected"]
    assert numpy.array_equal(evaluate.read_predictions(full).predicted, evaluate.read_predictions(main).predicted)
    for manifest in manifests:
        result = json.loads((graph.directory(graph.unit("curves", manifest["unit"])) / evaluate.RESULT).read_text())
        per_class = manifest["settings"]["labels_per_class"]
        assert result["labels_per_class"] == per_class and result["train_images"] == 6 * per_class
        assert result["fit_on"] == "train" and result["subset_seed"] == manifest["settings"]["seed"]
    # Second run: every point cached. Then one point lost: only it is rebuilt.
    _, _, lines = run(config)
    assert sum(line.startswith("[curves]") and "cached" in line for line in lines) == 4
    assert not any("building" in line for line in lines)
    cache.invalidate(graph.directory(graph.unit("curves", "tiny-resnet-logistic-n1-seed1")))
    _, _, lines = run(config)
    assert [line for line in lines if "building" in line] == [
        line for line in lines if line.startswith("[curves] tiny-resnet-logistic-n1-seed1: building")
    ]
    assert sum("building" in line for line in lines) == 1


def test_fit_on_train_and_val_does_not_reach_the_curves(tmp_path, fake_flowers_session):
    base = make_tiny_config(fake_flowers_session, tmp_path / "cache", LOGISTIC_ONLY)
    other = make_tiny_config(fake_flowers_session, tmp_path / "cache", (*LOGISTIC_ONLY, 'heads.fit_on="train+val"'))
    assert [unit.key for unit in Graph(base).units("curves")] == [unit.key for unit in Graph(other).units("curves")]


def test_end_to_end_switch(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache")
    units = Graph(config).units("curves")
    assert len(units) == 2 * 2 * 2 * 2  # backbones x kinds x labels per class x seeds, all frozen
    assert {unit.settings["arm_stage"] for unit in units} == {"heads"}
    assert {unit.input("features").stage for unit in units} == {"features"} and all(len(u.inputs) == 1 for u in units)
    switched = make_tiny_config(fake_flowers_session, tmp_path / "cache", ("curves.end_to_end=true",))
    names = [unit.name for unit in Graph(switched).units("curves")]
    assert names[16:] == [
        f"{method}-{unit}-n{n}-seed{seed}"
        for method, unit in (("scratch", "bn-cnn"), ("finetune", "tiny-resnet"))
        for n in (1, 4)
        for seed in (0, 1)
    ]


@pytest.mark.parametrize("stage, point", [("cnn", "scratch-bn-cnn"), ("finetune", "finetune-tiny-resnet")])
def test_the_whole_train_end_to_end_point_trains_exactly_as_its_arm(tmp_path, fake_flowers_session, stage, point):
    # The premise for ever reusing the arm as its whole-train seed-0 point: the same rows, order and seed.
    config = end_to_end_config(fake_flowers_session, tmp_path / "cache", "[4]", "cnn.epochs=2", "finetune.epochs=1")
    graph = Graph(config, log=lambda line: None)
    arm, whole = graph.units(stage)[0], graph.unit("curves", f"{point}-n4-seed0")
    graph.ensure(whole)  # first, so it trains: with its arm cached it would reuse the arm's files
    graph.ensure(arm)
    assert "reused_from" not in cache.read_manifest(graph.directory(whole))["extra"]
    results_of = [json.loads((graph.directory(unit) / evaluate.RESULT).read_text()) for unit in (arm, whole)]
    assert results_of[1]["train_images"] == results_of[0]["train_images"] == 24
    assert results_of[1]["test_top1"] == results_of[0]["test_top1"]
    losses = [[(row["train_loss"], row["val_loss"]) for row in result["history"]] for result in results_of]
    assert losses[0] == losses[1] and len(losses[0]) >= 1
    predictions = [evaluate.read_predictions(graph.directory(unit)).predicted for unit in (arm, whole)]
    assert numpy.array_equal(*predictions)


def test_a_whole_train_end_to_end_point_reuses_its_cached_arm_and_only_a_valid_one(tmp_path, fake_flowers_session):
    config = end_to_end_config(fake_flowers_session, tmp_path / "cache", "[1,4]", "cnn.epochs=1")
    lines = []
    graph = Graph(config, log=lines.append)
    arm, whole, part = graph.units("cnn")[0], *(graph.unit("curves", f"scratch-bn-cnn-n{n}-seed0") for n in (4, 1))
    graph.ensure(arm)
    graph.ensure(whole)
    graph.ensure(part)
    arm_manifest, whole_manifest = (cache.read_manifest(graph.directory(unit)) for unit in (arm, whole))
    expected = {"stage": "cnn", "unit": arm.name, "build_id": arm_manifest["build_id"]}
    assert whole_manifest["extra"]["reused_from"] == expected
    assert "reused_from" not in cache.read_manifest(graph.directory(part))["extra"]  # a subset is trained
    assert any("not trained again" in line for line in lines)
    for name in arm_manifest["files"]:
        if name != evaluate.RESULT:
            assert whole_manifest["digests"][name] == arm_manifest["digests"][name]
    records = [json.loads((graph.directory(unit) / evaluate.RESULT).read_text()) for unit in (arm, whole)]
    assert records[1]["labels_per_class"] == 4 and records[1]["subset_seed"] == 0
    assert {name: value for name, value in records[1].items() if name in records[0]} == records[0]
    # A damaged arm is never copied: the point trains, and scores what the arm scored.
    model = graph.directory(arm) / "model.pt"
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    cache.invalidate(graph.directory(whole))
    graph.ensure(whole)
    assert "reused_from" not in cache.read_manifest(graph.directory(whole))["extra"]
    retrained = json.loads((graph.directory(whole) / evaluate.RESULT).read_text())
    assert retrained["test_top1"] == records[0]["test_top1"]
    # An arm cached under other settings (here more epochs) is not this point's arm.
    graph.ensure(arm)
    longer = end_to_end_config(fake_flowers_session, tmp_path / "cache", "[4]", "cnn.epochs=2")
    longer_graph = Graph(longer, log=lambda line: None)
    longer_whole = longer_graph.unit("curves", "scratch-bn-cnn-n4-seed0")
    longer_graph.ensure(longer_whole)
    assert "reused_from" not in cache.read_manifest(longer_graph.directory(longer_whole))["extra"]
    assert json.loads((longer_graph.directory(longer_whole) / evaluate.RESULT).read_text())["epochs_run"] == 2


def test_a_new_code_version_of_the_arms_stage_rebuilds_its_points(tmp_path, fake_flowers_session, monkeypatch):
    from pipeline.stages import cnn, heads

    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", ("curves.end_to_end=true",))
    before = {unit.name: (unit.settings["arm_stage"], unit.key) for unit in Graph(config).units("curves")}
    monkeypatch.setattr(heads, "CODE_VERSION", heads.CODE_VERSION + "-next")
    monkeypatch.setattr(cnn, "CODE_VERSION", cnn.CODE_VERSION + "-next")
    after = {unit.name: unit.key for unit in Graph(config).units("curves")}
    changed = {stage for name, (stage, key) in before.items() if after[name] != key}
    unchanged = {stage for name, (stage, key) in before.items() if after[name] == key}
    assert changed == {"heads", "cnn"} and unchanged == {"finetune"}


def test_an_end_to_end_point_runs_its_arms_recipe_on_the_subset(tmp_path, fake_flowers_session):
    config = end_to_end_config(fake_flowers_session, tmp_path / "cache", "[1]", "cnn.epochs=1")
    graph = Graph(config, log=lambda line: None)
    unit = graph.unit("curves", "scratch-bn-cnn-n1-seed0")
    assert unit.settings["arm_stage"] == "cnn" and unit.input("download").stage == "download"
    assert {name: value for name, value in unit.settings.items() if name in graph.units("cnn")[0].settings} == (
        graph.units("cnn")[0].settings
    )
    graph.ensure(unit)
    result = json.loads((graph.directory(unit) / evaluate.RESULT).read_text())
    assert result["arm"] == "scratch-bn-cnn" and result["method"] == "scratch"
    assert result["train_images"] == 6 and result["labels_per_class"] == 1 and result["subset_seed"] == 0
    assert len(evaluate.read_predictions(graph.directory(unit)).predicted) == 36  # the whole test split, once


def test_report_shows_the_curves_or_says_they_were_not_run(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", LOGISTIC_ONLY)
    graph, _, _ = run(config, "heads")
    report = graph.directory(graph.unit("report", "study"))
    run(config, "report")
    html = (report / "report.html").read_text()
    assert "Label-efficiency curves: not run (run make curves)." in html and "pareto_front" not in html
    run(config)
    _, manifests, lines = run(config, "report")
    assert any(line.startswith("[report] study: building") for line in lines)  # the curves changed its key
    markdown = (report / "report.md").read_text()
    assert "label_efficiency.png" in markdown and "pareto_front.png" in markdown
    assert (report / "label_efficiency.png").is_file() and (report / "pareto_front.png").is_file()
    lines = markdown.splitlines()
    table = lines.index("| Arm | Labels per class | Train images | Runs | Test top-1 % | Total s |")
    assert [row.split(" | ")[:4] for row in lines[table + 2 : table + 4]] == [
        ["| frozen-tiny-resnet-logistic", "1", "6", "2"],
        ["| frozen-tiny-resnet-logistic", "4", "24", "2"],
    ]
    assert "Non-dominated" in markdown
    assert "Deterministic heads (logistic: nothing in their fit depends on the seed)" in markdown


def test_the_notes_on_seeds_name_the_kinds_flagged_deterministic(monkeypatch):
    assert report_sections.deterministic_note(["softmax"]) == ""
    assert "the logistic and knn heads are deterministic" in report_sections.deterministic_note(
        ["knn", "softmax", "logistic"]
    )
    flipped = dataclasses.replace(head_kinds.get_head_kind("softmax"), deterministic=True)
    monkeypatch.setitem(head_kinds._REGISTRY, "softmax", flipped)
    assert "the softmax head is deterministic" in report_sections.deterministic_note(["softmax"])


@pytest.mark.parametrize("name", head_kinds.available_head_kinds())
def test_a_kind_flagged_deterministic_ignores_the_seed_and_the_others_do_not(separable_problem, name):
    kind = head_kinds.get_head_kind(name)
    settings = kind.settings()

    def fitted(seed):
        problem = dataclasses.replace(separable_problem, seed=seed)
        chosen, _, payload = kind.select(settings, problem)
        return chosen, kind.probabilities({**payload, "class_names": ["a", "b", "c"]})(problem.val[0])

    (first, scores), (second, other_scores) = fitted(0), fitted(1)
    same = first == second and numpy.array_equal(scores, other_scores)
    assert same == kind.deterministic, name


def point_result(graph, name) -> dict:
    return json.loads((graph.directory(graph.unit("curves", name)) / evaluate.RESULT).read_text())


def test_whole_train_points_of_a_deterministic_kind_are_searched_once_and_equal_a_fresh_search(
    tmp_path, fake_flowers_session
):
    overrides = ('features.backbones=["tiny-resnet"]', 'heads.kinds=["logistic", "knn", "softmax"]')
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", overrides)
    graph, _, _ = run(config, "heads")
    graph, _, lines = run(config)
    for kind in ("logistic", "knn"):
        # n=4 is every class's whole train split: the heads arm's search serves both seeds.
        for seed in (0, 1):
            result = point_result(graph, f"tiny-resnet-{kind}-n4-seed{seed}")
            assert result["selection_reused"] is True and result["selection_from"] == f"heads/tiny-resnet-{kind}"
            # The same head on the same test features: the arm's test predictions, not evaluated again.
            assert result["evaluation_reused"] is True
        assert not point_result(graph, f"tiny-resnet-{kind}-n1-seed1")["selection_reused"]
        assert not point_result(graph, f"tiny-resnet-{kind}-n1-seed1")["evaluation_reused"]
    # The softmax head depends on its seed: only seed 0's whole-train point equals its (seed 0) arm.
    assert point_result(graph, "tiny-resnet-softmax-n4-seed0")["selection_from"] == "heads/tiny-resnet-softmax"
    assert point_result(graph, "tiny-resnet-softmax-n4-seed1")["selection_reused"] is False
    assert point_result(graph, "tiny-resnet-softmax-n4-seed1")["evaluation_reused"] is False
    assert sum("(reused from" in line for line in lines) == 5
    # Without the heads arm (a fresh cache), seed 0 searches and seed 1 reuses its memo: the same numbers.
    fresh, _, _ = run(make_tiny_config(fake_flowers_session, tmp_path / "fresh", overrides))
    for kind in ("logistic", "knn"):
        searched, reused = (point_result(fresh, f"tiny-resnet-{kind}-n4-seed{seed}") for seed in (0, 1))
        assert (
            searched["selection_reused"] is False and reused["selection_from"] == f"curves/tiny-resnet-{kind}-n4-seed0"
        )
        shared = point_result(graph, f"tiny-resnet-{kind}-n4-seed1")
        for name in ("test_top1", "selected", "candidates"):
            assert searched[name] == reused[name] == shared[name]
        assert searched["evaluation_reused"] is False and reused["evaluation_reused"] is True
        predictions = [
            evaluate.read_predictions(fresh.directory(fresh.unit("curves", f"tiny-resnet-{kind}-n4-seed{seed}")))
            for seed in (0, 1)
        ]
        assert numpy.array_equal(predictions[0].predicted, predictions[1].predicted)
    # A search setting changed: every logistic point is built again and none reuses the old searches.
    changed = make_tiny_config(fake_flowers_session, tmp_path / "cache", (*overrides, "heads.logistic.cs=[0.5, 2.0]"))
    graph, manifests, _ = run(changed)
    rebuilt = [manifest for manifest in manifests if "-logistic-" in manifest["unit"]]
    assert len(rebuilt) == 4 and all(m["settings"]["logistic_cs"] == [0.5, 2.0] for m in rebuilt)
    assert point_result(graph, "tiny-resnet-logistic-n4-seed0")["selection_reused"] is False
    assert (
        point_result(graph, "tiny-resnet-logistic-n4-seed1")["selection_from"] == "curves/tiny-resnet-logistic-n4-seed0"
    )
