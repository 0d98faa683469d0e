"""The head-kind registry and the k-NN head: every kind round-trips, k-NN votes and chooses by rule, and a new
kind registered from outside the library runs through the heads stage and `make predict` untouched."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass

import numpy
import pytest
from helpers import make_tiny_config

from pipeline import cache, evaluate, features_h5, head_kinds, predict, results
from pipeline.config import ConfigError, describe_settings
from pipeline.features_h5 import features_file
from pipeline.graph import Graph
from pipeline.head_kinds import HeadKind, Problem, fitting, knn
from pipeline.head_kinds.linear import Normalizer, accuracy
from pipeline.settings import setting

ONE_BACKBONE = ('features.backbones=["tiny-resnet"]',)
pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(per_class: int, seed: int, classes: int = 4, dims: int = 10):
    """Separable Gaussian clusters (centres far apart relative to the noise)."""
    centres = numpy.random.default_rng(0).normal(0, 6, (classes, dims))
    labels = numpy.repeat(numpy.arange(classes), per_class)
    noise = numpy.random.default_rng(seed).normal(0, 0.5, (len(labels), dims))
    return (centres[labels] + noise).astype(numpy.float32), labels


@pytest.fixture(scope="module")
def separable():
    return blobs(15, 1), blobs(10, 2), blobs(20, 3)


def test_registry_lists_the_kinds_and_names_them_in_its_errors():
    assert head_kinds.available_head_kinds() == ("softmax", "logistic", "knn")
    with pytest.raises(head_kinds.HeadError, match="unknown head kind 'svm'; valid kinds: softmax, logistic, knn"):
        head_kinds.get_head_kind("svm")
    softmax = head_kinds.get_head_kind("softmax")
    with pytest.raises(head_kinds.HeadError, match="already registered"):
        head_kinds.register_head_kind(softmax)
    with pytest.raises(head_kinds.HeadError, match="file name 'head.pt' is already used by 'softmax'"):
        head_kinds.register_head_kind(dataclasses.replace(softmax, name="other"))


@pytest.mark.parametrize("name", head_kinds.available_head_kinds())
def test_every_kind_separates_clusters_and_round_trips_its_file(separable, tmp_path, name):
    kind = head_kinds.get_head_kind(name)
    train, val, test = separable
    chosen, candidates, payload = kind.select(kind.settings(), Problem(train, val, 4, ["none", "l2"], 0))
    assert chosen["val_top1"] == max(candidate["val_top1"] for candidate in candidates) == 1.0
    assert kind.finite(payload)
    saved = {**payload, "kind": name, "backbone": "blobs", "class_names": list("abcd"), "selected": chosen}
    kind.save(tmp_path / kind.file_name, saved)
    assert head_kinds.saved_kind(tmp_path) is kind
    loaded = kind.load(tmp_path / kind.file_name)
    predictions = kind.predictor(loaded)(test[0])
    assert accuracy(test[1], predictions) >= 0.9  # softmax stops at the first epoch that is perfect on val
    assert predictions.tolist() == kind.predictor(saved)(test[0]).tolist()
    probabilities = kind.probabilities(loaded)(test[0])
    assert probabilities.shape == (len(test[1]), 4)
    numpy.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    numpy.testing.assert_array_equal(probabilities, kind.probabilities(saved)(test[0]))
    assert probabilities.argmax(axis=1).tolist() == predictions.tolist()
    # The refit on more rows keeps the choice it was given.
    refit_choice, refit_payload = kind.refit(kind.settings(), chosen, *train, 4, 0)
    assert {key: refit_choice[key] for key in chosen} == chosen
    assert accuracy(test[1], kind.predictor(refit_payload)(test[0])) >= 0.9


# --- k-NN --------------------------------------------------------------------------------------------


def naive_knn(stored, labels, queries, k, temperature, classes):
    """The vote written out row by row in float64, without blocks or shifts, for comparison; `stored` rows
    are taken as they are (the head stores them at unit length), queries are scaled to unit length."""
    queries = queries / numpy.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    for query in queries:
        similarities = stored @ query
        order = sorted(range(len(stored)), key=lambda index: (-similarities[index], index))[:k]
        votes = numpy.zeros(classes)
        for index in order:
            votes[labels[index]] += numpy.exp(similarities[index] / temperature)
        rows.append(votes / votes.sum())
    return numpy.array(rows)


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (7, 0.03), (25, 0.2)])
def test_knn_vote_matches_the_vote_written_out(k, temperature, monkeypatch):
    generator = numpy.random.default_rng(4)
    stored, labels = generator.normal(size=(40, 6)), generator.integers(0, 5, 40)
    queries = generator.normal(size=(13, 6))
    payload = {
        **knn.store(Normalizer("none"), stored, labels, 5),
        "k": k,
        "temperature": temperature,
    }
    monkeypatch.setattr(knn, "BLOCK_ELEMENTS", 3 * 40)  # blocks of three query rows
    found = knn.probabilities(payload)(queries)
    stored16 = payload["features"].astype(numpy.float64)  # the vote sees the stored half-precision rows
    numpy.testing.assert_allclose(found, naive_knn(stored16, labels, queries, k, temperature, 5), atol=1e-5)


def test_knn_breaks_ties_by_row_then_by_label():
    stored = numpy.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = numpy.array([2, 1, 0])
    query = numpy.array([[1.0, 0.0]])

    def predicted(k):
        payload = {**knn.store(Normalizer("none"), stored, labels, 3), "k": k, "temperature": 0.1}
        return head_kinds.get_head_kind("knn").predictor(payload)(query).tolist()

    assert predicted(1) == [2]  # two rows equally similar: the earlier one is the neighbour
    assert predicted(2) == [1]  # equal votes for classes 1 and 2: the lower label wins


def test_knn_partial_sort_keeps_the_tie_rule():
    """The partial sort gives what a full stable sort gives, on rows full of ties and on rows with none."""
    generator = numpy.random.default_rng(0)
    for _ in range(200):
        columns, rows = int(generator.integers(1, 40)), int(generator.integers(1, 10))
        count = int(generator.integers(1, columns + 1))
        for similarities in (generator.integers(-3, 4, (rows, columns)) / 3, generator.normal(size=(rows, columns))):
            similarities = similarities.astype(numpy.float32)
            expected = numpy.argsort(-similarities, axis=1, kind="stable")[:, :count]
            numpy.testing.assert_array_equal(knn.most_similar(similarities, count), expected)


def test_knn_chooses_k_and_temperature_on_val():
    """A small tight class beside a large spread one: only a small k (or a sharp T) finds the small class."""
    generator = numpy.random.default_rng(0)
    direction = numpy.array([1.0, 0.0, 0.0])
    large = direction + generator.normal(0, 0.6, (60, 3))
    small = direction + numpy.array([0.0, 0.25, 0.0]) + generator.normal(0, 0.02, (3, 3))
    fit = (numpy.concatenate([large, small]).astype(numpy.float32), numpy.array([0] * 60 + [1] * 3))
    val = (
        (direction + numpy.array([0.0, 0.25, 0.0]) + generator.normal(0, 0.02, (5, 3))).astype(numpy.float32),
        numpy.ones(5, dtype=int),
    )
    settings = knn.KnnSettings(ks=[50, 3], temperatures=[0.2, 0.01])
    chosen, candidates, payload = knn.select(settings, Problem(fit, val, 2, ["none"], 0))
    scores = {(candidate["k"], candidate["temperature"]): candidate["val_top1"] for candidate in candidates}
    assert list(scores) == [(50, 0.2), (50, 0.01), (3, 0.2), (3, 0.01)]  # the grid in the order given
    assert scores[(50, 0.2)] < 1.0 and chosen["val_top1"] == 1.0
    # The first grid point reaching the best val score wins; the payload carries it.
    best = next(point for point, score in scores.items() if score == 1.0)
    assert (chosen["k"], chosen["temperature"]) == best == (payload["k"], payload["temperature"])
    # A k beyond the stored rows uses them all, and the same k is not tried twice.
    chosen, candidates, _ = knn.select(knn.KnnSettings(ks=[100, 63, 3]), Problem(fit, val, 2, ["none"], 0))
    assert [candidate["k"] for candidate in candidates[::3]] == [63, 3]


def test_knn_file_is_compact_and_loads_without_pickle(separable, tmp_path):
    kind = head_kinds.get_head_kind("knn")
    _, _, payload = kind.select(kind.settings(), Problem(*separable[:2], 4, ["standardize"], 0))
    kind.save(tmp_path / "head.npz", {**payload, "class_names": list("abcd"), "selected": {"k": payload["k"]}})
    with numpy.load(tmp_path / "head.npz", allow_pickle=False) as saved:
        assert saved["features"].dtype == numpy.float16 and saved["features"].shape == (60, 10)
        assert {"normalizer_mean", "normalizer_scale", "labels", "metadata"} <= set(saved.files)
    loaded = kind.load(tmp_path / "head.npz")
    assert loaded["normalizer"]["kind"] == "standardize" and loaded["class_names"] == list("abcd")


def test_knn_stage_runs_fits_on_train_and_val_and_its_saved_head_reproduces_test(tmp_path, fake_flowers_session):
    overrides = ONE_BACKBONE + ('heads.kinds=["knn"]', 'heads.fit_on="train+val"')
    graph = Graph(make_tiny_config(fake_flowers_session, tmp_path / "cache", overrides), log=lambda line: None)
    (manifest,) = graph.run("heads")
    folder = graph.directory(graph.units("heads")[0])
    result = json.loads((folder / evaluate.RESULT).read_text())
    assert result["arm"] == "frozen-tiny-resnet-knn" and result["head"] == "knn" and result["fit_rows"] == 48
    assert {"k", "temperature", "normalization", "val_top1"} <= set(result["selected"])
    assert len(result["candidates"]) == 4 * 3  # ks 5, 10, 20 and 50 cut to the 24 train rows
    assert manifest["settings"]["knn_ks"] == [5, 10, 20, 50] and "softmax_lr" not in manifest["settings"]
    test = features_h5.read_group(features_file(graph.directory(graph.unit("features", "tiny-resnet"))), "test")
    assert accuracy(test["labels"], fitting.load_head(folder)(test["features"])) == pytest.approx(result["test_top1"])
    with numpy.load(folder / "head.npz") as saved:
        assert len(saved["labels"]) == 48


# --- a kind from outside the library -----------------------------------------------------------------


@dataclass(frozen=True)
class CentroidSettings:
    shrink: float = setting(0.0, "Pull of each class mean towards the overall mean.", minimum=0, maximum=1)


def centroid_payload(settings, features, labels, num_classes):
    means = numpy.stack([features[labels == label].mean(axis=0) for label in range(num_classes)])
    return {"means": (1 - settings.shrink) * means + settings.shrink * features.mean(axis=0)}


def centroid_probabilities(payload):
    def probabilities(features):
        scores = -numpy.linalg.norm(features[:, None, :] - payload["means"][None], axis=2)
        scores = numpy.exp(scores - scores.max(axis=1, keepdims=True))
        return scores / scores.sum(axis=1, keepdims=True)

    return probabilities


def centroid_select(settings, problem):
    payload = centroid_payload(settings, *problem.fit, problem.num_classes)
    top1 = accuracy(problem.val[1], centroid_probabilities(payload)(problem.val[0]).argmax(axis=1))
    choice = {"shrink": settings.shrink, "val_top1": top1}
    return choice, [choice], payload


def centroid_save(path, payload):
    with open(path, "wb") as handle:
        numpy.savez(handle, means=payload["means"])


def centroid_load(path):
    with numpy.load(path) as saved:
        return {"means": saved["means"]}


CENTROID = HeadKind(
    name="centroid",
    settings=CentroidSettings,
    file_name="head.centroid.npz",
    select=centroid_select,
    refit=lambda settings, chosen, features, labels, classes, seed: (
        chosen,
        centroid_payload(settings, features, labels, classes),
    ),
    save=centroid_save,
    load=centroid_load,
    probabilities=centroid_probabilities,
    finite=lambda payload: bool(numpy.isfinite(payload["means"]).all()),
    remedy="check the features",
    deterministic=True,
)


@pytest.fixture
def centroid_kind(monkeypatch):
    monkeypatch.setattr(head_kinds, "_REGISTRY", dict(head_kinds._REGISTRY))
    head_kinds.register_head_kind(CENTROID)


def test_a_kind_registered_outside_the_library_runs_through_the_stage_and_predict(
    centroid_kind, tmp_path, fake_flowers_session
):
    overrides = ONE_BACKBONE + ('heads.kinds=["centroid", "knn"]', "heads.centroid.shrink=0.5")
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", overrides)
    assert config.heads.table("centroid").shrink == 0.5
    assert ("heads.centroid", "shrink", 0.0, "Pull of each class mean towards the overall mean.") in describe_settings()
    graph = Graph(config, log=lambda line: None)
    manifests = graph.run("heads")
    assert [manifest["unit"] for manifest in manifests] == ["tiny-resnet-centroid", "tiny-resnet-knn"]
    assert manifests[0]["settings"]["centroid_shrink"] == 0.5
    folder = graph.directory(graph.units("heads")[0])
    result = json.loads((folder / evaluate.RESULT).read_text())
    results.check_result(result)
    assert result["arm"] == "frozen-tiny-resnet-centroid" and result["selected"]["shrink"] == 0.5
    assert (folder / "head.centroid.npz").is_file() and cache.read_manifest(folder) is not None
    features = features_h5.read_group(features_file(graph.directory(graph.unit("features", "tiny-resnet"))), "test")
    probabilities = predict.head_probabilities(folder)(features["features"])
    assert accuracy(features["labels"], probabilities.argmax(axis=1)) == pytest.approx(result["test_top1"])
    with pytest.raises(ConfigError, match="unknown key"):
        make_tiny_config(fake_flowers_session, tmp_path / "cache", ("heads.centroid.scale=1",))


def test_the_softmax_heads_adamw_steps_are_torchs_adamw_bit_for_bit():
    import torch

    from pipeline.head_kinds.softmax import AdamWSteps

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(6, 5, generator=generator), torch.randn(6, generator=generator)]
    ours = [torch.nn.Parameter(tensor.clone()) for tensor in start]
    theirs = [torch.nn.Parameter(tensor.clone()) for tensor in start]
    optimizers = AdamWSteps(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.0)
    for _ in range(30):
        gradients = [torch.randn(tensor.shape, generator=generator) for tensor in start]
        for parameters, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.grad = gradient.clone()
            optimizer.step()
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


def test_training_a_softmax_head_does_not_import_torch_dynamo():
    # Its import cost seconds in every curve worker (see AdamWSteps).
    script = (
        "import sys, numpy\n"
        "from pipeline.head_kinds.softmax import train_softmax\n"
        "rows = numpy.random.default_rng(0).normal(size=(20, 4)).astype(numpy.float32)\n"
        "train_softmax(rows, numpy.arange(20) % 2, 2, weight_decay=0.1, epochs=2, lr=0.1, batch_size=8,\n"
        "              label_smoothing=0.0, seed=0)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
