"""The heads stage and its linear heads: selection on val only, exact refits, results, cache behaviour."""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy
import pytest
import torch
from helpers import make_tiny_config

from pipeline import cache, evaluate, features_h5, results
from pipeline.config import HeadsConfig
from pipeline.features_h5 import features_file
from pipeline.graph import Graph
from pipeline.head_kinds import fitting, linear, logistic, softmax
from pipeline.stages import heads

ONE_BACKBONE = ('features.backbones=["tiny-resnet"]',)
# Tiny heads on two shared cores: torch's second thread only spins (runs took 2-4x longer with it).
pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(per_class: int, seed: int, classes: int = 5, dims: int = 12):
    """Linearly separable Gaussian clusters (centres far apart relative to the noise)."""
    generator = numpy.random.default_rng(0)
    centres = generator.normal(0, 6, (classes, dims))
    noise = numpy.random.default_rng(seed)
    labels = numpy.repeat(numpy.arange(classes), per_class)
    return (centres[labels] + noise.normal(0, 0.5, (len(labels), dims))).astype(numpy.float32), labels


@pytest.fixture(scope="module")
def separable():
    return blobs(20, 1), blobs(20, 2), blobs(40, 3)


@pytest.mark.parametrize("normalization", ["none", "l2-standardize"])
def test_both_heads_separate_a_separable_set(separable, normalization):
    train, val, test = separable
    _, _, head, normalizer = softmax.select_softmax(
        train,
        val,
        5,
        normalizations=[normalization],
        weight_decays=[0.0],
        epochs=40,
        lr=1e-2,
        batch_size=32,
        label_smoothing=0.0,
        seed=0,
    )
    assert linear.accuracy(test[1], softmax.predict_softmax(head, normalizer.apply(test[0]))) >= 0.99
    _, _, model, normalizer = logistic.select_logistic(
        train, val, normalizations=[normalization], cs=[1.0], solver="lbfgs", max_iter=500, tolerance=1e-4, seed=0
    )
    assert linear.accuracy(test[1], model.predict(normalizer.apply(test[0]))) >= 0.99


def test_random_labels_stay_near_chance(separable):
    """The separable test above can fail: the same heads on shuffled labels do not generalise."""
    train, val, test = separable
    shuffled = (train[0], numpy.random.default_rng(5).permutation(train[1]))
    _, _, model, normalizer = logistic.select_logistic(
        shuffled, val, normalizations=["none"], cs=[1.0], solver="lbfgs", max_iter=500, tolerance=1e-4, seed=0
    )
    assert linear.accuracy(test[1], model.predict(normalizer.apply(test[0]))) < 0.6


def test_best_epoch_head_equals_a_refit_of_that_many_epochs(separable):
    train, val, _ = separable
    options = {"weight_decay": 0.1, "lr": 1e-2, "batch_size": 16, "label_smoothing": 0.0, "seed": 3}
    selected, history = softmax.train_softmax(*train, 5, epochs=15, val_features=val[0], val_labels=val[1], **options)
    best_epoch = int(numpy.argmax(history)) + 1
    refit, _ = softmax.train_softmax(*train, 5, epochs=best_epoch, **options)
    for name, value in selected.state_dict().items():
        torch.testing.assert_close(value, refit.state_dict()[name])


def test_patience_stops_once_no_head_improves_and_keeps_each_heads_best_epoch(separable):
    train, val, _ = separable
    options = {"weight_decays": [0.0, 3.0], "epochs": 60, "lr": 1e-2, "batch_size": 16, "label_smoothing": 0.0}
    options.update(seed=3, val_features=val[0], val_labels=val[1])
    full = softmax.train_softmax_heads(*train, 5, **options)
    stopped = softmax.train_softmax_heads(*train, 5, patience=3, **options)
    length = len(stopped[0][1])
    assert 3 < length < 60  # these blobs are separated within a few epochs, so it did stop early
    for (_, history), (_, full_history) in zip(stopped, full, strict=True):
        # The same run cut short: the histories are a prefix, stopped `patience` epochs after the last rise.
        assert history == full_history[:length] and length - 1 - int(numpy.argmax(history)) >= 3
    # Each stopped head equals a refit of its best epoch (the exactness selection relies on).
    for decay, (head, history) in zip(options["weight_decays"], stopped, strict=True):
        refit, _ = softmax.train_softmax(
            *train,
            5,
            weight_decay=decay,
            epochs=int(numpy.argmax(history)) + 1,
            lr=1e-2,
            batch_size=16,
            label_smoothing=0.0,
            seed=3,
        )
        for name, value in head.state_dict().items():
            torch.testing.assert_close(value, refit.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_heads_trained_side_by_side_follow_their_own_runs(separable):
    """Several weight decays trained as one matrix give each decay's own run: same val history, same weights."""
    train, val, _ = separable
    options = {
        "epochs": 12,
        "lr": 1e-2,
        "batch_size": 16,
        "label_smoothing": 0.1,
        "seed": 4,
        "val_features": val[0],
        "val_labels": val[1],
    }
    together = softmax.train_softmax_heads(*train, 5, weight_decays=[0.0, 3.0, 30.0], **options)
    alone = [softmax.train_softmax(*train, 5, weight_decay=decay, **options) for decay in (0.0, 3.0, 30.0)]
    for (head, history), (reference, reference_history) in zip(together, alone, strict=True):
        assert history == reference_history
        for name, value in head.state_dict().items():
            torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-5, atol=1e-6)
    # The decays did act: the strongest one shrank its head the most.
    norms = [head.weight.norm().item() for head, _ in together]
    assert norms[0] > norms[1] > norms[2]


def test_logistic_fit_runs_under_the_blas_thread_limit(separable):
    from threadpoolctl import threadpool_info

    seen = []

    class Recording:
        n_iter_ = numpy.array([1])

        def fit(self, features, labels):
            seen.append([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"])
            return self

    logistic.fit_logistic(Recording(), *separable[0], blas_threads=1)
    assert seen[0] and all(count == 1 for count in seen[0])
    before = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    logistic.fit_logistic(Recording(), *separable[0], blas_threads=0)
    assert seen[1] == before  # 0 leaves the library's own setting alone


def test_normalizer_uses_fit_statistics_only():
    fit = numpy.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0]], dtype=numpy.float32)
    other = numpy.array([[100.0, 0.0, 2.0]], dtype=numpy.float32)
    normalizer = linear.Normalizer.fit("standardize", fit)
    numpy.testing.assert_allclose(normalizer.apply(fit), [[-1, 0, 0], [1, 0, 0]], atol=1e-6)
    numpy.testing.assert_allclose(normalizer.apply(other), [[98, -5, 0]], atol=1e-4)  # constant columns: scale 1
    l2 = linear.Normalizer.fit("l2", fit).apply(other)
    numpy.testing.assert_allclose(numpy.linalg.norm(l2, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="l2-standardize"):
        linear.Normalizer.fit("whiten", fit)


def test_config_offers_exactly_the_implemented_normalizations():
    spec = next(field for field in dataclasses.fields(HeadsConfig) if field.name == "normalizations")
    assert tuple(spec.metadata["choices"]) == linear.NORMALIZATIONS


def test_head_settings_hold_only_what_that_kind_uses(tiny_config):
    softmax, logistic = (heads.head_settings(tiny_config, kind) for kind in ("softmax", "logistic"))
    assert "softmax_epochs" in softmax and not any(name.startswith("logistic_") for name in softmax)
    assert "logistic_cs" in logistic and not any(name.startswith("softmax_") for name in logistic)
    assert {"fit_on", "normalizations", "seed"} <= set(softmax) & set(logistic)
    assert "kinds" not in softmax and "tables" not in softmax
    # Early stopping off (its default) keeps the key softmax heads had before the setting existed.
    assert "softmax_patience" not in softmax
    stopping = make_tiny_config(tiny_config.data.root, tiny_config.cache.root, ("heads.softmax.patience=10",))
    assert heads.head_settings(stopping, "softmax")["softmax_patience"] == 10


def run_heads(config):
    lines = []
    graph = Graph(config, log=lines.append)
    return graph, graph.run("heads"), lines


def test_results_heads_files_and_timings(tmp_path, fake_flowers_session):
    graph, manifests, _ = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE))
    assert [manifest["unit"] for manifest in manifests] == ["tiny-resnet-softmax", "tiny-resnet-logistic"]
    path = features_file(graph.directory(graph.unit("features", "tiny-resnet")))
    test = features_h5.read_group(path, "test")
    extract_seconds = sum(record["seconds"] for record in features_h5.read_attributes(path)["timings"].values())
    for unit in graph.units("heads"):
        folder = graph.directory(unit)
        result = json.loads((folder / evaluate.RESULT).read_text())
        assert set(results.REQUIRED_FIELDS) <= set(result)
        kind = unit.settings["kind"]
        assert result["arm"] == f"frozen-tiny-resnet-{kind}" and result["method"] == "frozen"
        assert result["head"] == kind and result["fit_on"] == "train" and result["train_images"] == 24
        assert result["extract_seconds"] == pytest.approx(extract_seconds)
        assert result["total_seconds"] == pytest.approx(
            result["extract_seconds"] + result["train_seconds"] + result["eval_seconds"]
        )
        assert result["train_seconds"] == pytest.approx(
            result["timings"]["head_selection"] + result["timings"]["head_fit"]
        )
        assert set(result["timings"]["extract"]) == {"train", "val", "test"}
        assert numpy.array(result["confusion_matrix"]).shape == (6, 6)
        assert numpy.array(result["confusion_matrix"]).sum() == 36
        assert len(result["candidates"]) >= 2 and result["selected"]["val_top1"] == result["val_top1"]
        # The saved head reproduces the reported test accuracy.
        predictions = fitting.load_head(folder)(test["features"])
        assert linear.accuracy(test["labels"], predictions) == pytest.approx(result["test_top1"])
        # And its per-image predictions are saved, verified, image by image.
        saved = evaluate.read_predictions(folder)
        assert numpy.array_equal(saved.image_ids, test["image_ids"]) and numpy.array_equal(saved.predicted, predictions)
        assert numpy.array_equal(saved.labels, test["labels"])


def test_fit_on_train_and_val_is_recorded(tmp_path, fake_flowers_session):
    config = make_tiny_config(
        fake_flowers_session,
        tmp_path / "cache",
        ONE_BACKBONE + ('heads.fit_on="train+val"', 'heads.kinds=["logistic"]'),
    )
    graph, _, _ = run_heads(config)
    result = json.loads((graph.directory(graph.units("heads")[0]) / evaluate.RESULT).read_text())
    assert result["fit_on"] == "train+val" and result["train_images"] == 48 and result["fit_rows"] == 48
    assert result["timings"]["head_fit"] > 0


def test_head_change_refits_only_that_kind(tmp_path, fake_flowers_session):
    base = make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE)
    graph, first, _ = run_heads(base)
    features_build = graph.run("features")[0]["build_id"]
    changed = make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE + ("heads.logistic.cs=[2.0]",))
    graph, second, lines = run_heads(changed)
    assert graph.run("features")[0]["build_id"] == features_build
    assert not any("[features] tiny-resnet: building" in line for line in lines)
    by_unit = {manifest["unit"]: manifest["build_id"] for manifest in first}
    assert second[0]["build_id"] == by_unit["tiny-resnet-softmax"]  # softmax untouched
    assert second[1]["build_id"] != by_unit["tiny-resnet-logistic"]
    assert second[1]["extra"]["selected"]["c"] == 2.0


def test_selection_and_fit_never_read_test(tmp_path, fake_flowers_session):
    """Scrambling the test features changes test metrics only: nothing chosen or fitted depends on them."""
    graph, first, _ = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE))
    path = features_file(graph.directory(graph.unit("features", "tiny-resnet")))
    with h5py.File(path, "a") as handle:
        handle["test"]["features"][...] = numpy.random.default_rng(0).normal(size=handle["test"]["features"].shape)
    rerun = Graph(graph.config, log=lambda line: None).run("heads", force=True)
    for before, after in zip(first, rerun, strict=True):
        assert after["extra"]["selected"] == before["extra"]["selected"]
        assert after["metrics"]["val_top1"] == before["metrics"]["val_top1"]


def test_empty_normalizations_is_a_config_error(tmp_path, fake_flowers_session):
    from pipeline.config import ConfigError

    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE + ("heads.normalizations=[]",))
    with pytest.raises(ConfigError, match="normalizations"):
        Graph(config).units("heads")


def test_fit_on_change_reuses_the_selection_and_matches_a_fresh_run(tmp_path, fake_flowers_session):
    """fit_on does not change what val selects, so switching it skips the search; results equal a cold run."""
    train_only = ONE_BACKBONE + ('heads.fit_on="train"',)
    both = ONE_BACKBONE + ('heads.fit_on="train+val"',)
    run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", train_only))
    graph, switched, lines = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", both))
    assert [manifest["extra"]["selection_reused"] for manifest in switched] == [True, True]
    assert sum("(reused)" in line for line in lines) == 2
    _, cold, _ = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cold", both))
    for reused, fresh in zip(switched, cold, strict=True):
        assert reused["extra"]["selected"] == fresh["extra"]["selected"]
        assert reused["metrics"] == pytest.approx(fresh["metrics"])
    # Back to train: the train-fitted head itself comes from the memo and matches the first run.
    _, back, _ = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", train_only))
    _, cold_train, _ = run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cold", train_only))
    for reused, fresh in zip(back, cold_train, strict=True):
        assert reused["metrics"] == pytest.approx(fresh["metrics"])
    result = json.loads((graph.directory(graph.units("heads")[0]) / evaluate.RESULT).read_text())
    assert result["selection_reused"] is True and result["timings"]["head_selection"] > 0


def test_selection_memo_is_not_reused_when_a_search_setting_or_the_features_change(tmp_path, fake_flowers_session):
    run_heads(make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE))
    _, changed, _ = run_heads(
        make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE + ("heads.softmax.epochs=7",))
    )
    assert changed[0]["extra"]["selection_reused"] is False  # softmax searched again
    graph = Graph(make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE), log=lambda line: None)
    graph.invalidate("features")  # same key, new build id
    _, rebuilt, _ = run_heads(graph.config)
    assert [manifest["extra"]["selection_reused"] for manifest in rebuilt] == [False, False]


def test_invalidate_and_force_drop_the_selection_memo(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE + ('heads.kinds=["logistic"]',))
    graph, _, _ = run_heads(config)
    memo_folder = graph.directory(graph.units("heads")[0]) / cache.MEMO
    assert len(list(memo_folder.iterdir())) == 1
    assert graph.invalidate("heads") == ["tiny-resnet-logistic"] and not memo_folder.exists()
    _, rerun, _ = run_heads(config)
    assert rerun[0]["extra"]["selection_reused"] is False
    forced = Graph(config, log=lambda line: None).run("heads", force=True)
    assert forced[0]["extra"]["selection_reused"] is False


def test_damaged_selection_memo_is_searched_again(tmp_path, fake_flowers_session):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", ONE_BACKBONE + ('heads.kinds=["logistic"]',))
    graph, first, _ = run_heads(config)
    folder = graph.directory(graph.units("heads")[0])
    (memo,) = (folder / cache.MEMO).iterdir()
    memo.write_bytes(b"not a joblib file")
    cache.invalidate(folder)
    _, again, lines = run_heads(config)
    assert again[0]["extra"]["selection_reused"] is False and any("unreadable selection memo" in line for line in lines)
    assert again[0]["metrics"] == pytest.approx(first[0]["metrics"])


def test_memos_are_pruned_to_the_newest(tmp_path):
    folder = tmp_path / "unit"
    for index in range(cache.MEMOS_KEPT + 3):
        path = cache.memo_path(folder, f"key{index:02d}", ".joblib")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(index))
        os.utime(path, (index, index))
    cache.prune_memos(folder)
    kept = sorted(path.name for path in (folder / cache.MEMO).iterdir())
    assert kept == [f"key{index:02d}.joblib" for index in range(3, cache.MEMOS_KEPT + 3)]
