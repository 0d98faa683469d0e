"""The k-NN head (as DINO evaluates features): a weighted vote of the nearest training rows by cosine similarity.

Each query row, normalised like the training rows and scaled to unit length, is compared with every
stored training row; its k most similar rows vote for their classes with weight exp(similarity / T),
and the votes, divided by their sum, are its class probabilities. k, T and the feature
normalisation are chosen on val. "Fitting" stores the normalised training rows (float16, unit
length), so the search on val is the time this head costs; the saved head is those rows, their
labels and the choice, in one .npz file.

Ties are broken by rule, so results never depend on sorting internals: among equally similar rows
the earlier training row ranks first, and among classes with equal votes the lower label wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy

from ..settings import check_grid, setting
from . import HeadKind, Problem
from .linear import Normalizer, accuracy, best_on_val

TABLE = "heads.knn"
# Similarities held at once (query rows x stored rows): with their negated copy and the partial sort's
# int64 indices 16 bytes each, so a block stays near 64 MB however many rows are queried or stored.
BLOCK_ELEMENTS = 1 << 22
STORED_DTYPE = numpy.float16  # unit-length rows lose nothing a vote can see at half precision


@dataclass(frozen=True)
class KnnSettings:
    ks: list = setting(
        [5, 10, 20, 50], "Neighbour counts k tried on val (a k above the stored rows uses them all).", minimum=1
    )
    temperatures: list = setting(
        [0.03, 0.07, 0.2], "Temperatures T tried on val: each neighbour votes with weight exp(similarity / T)."
    )

    def __post_init__(self):
        check_grid(TABLE, "ks", self.ks)
        check_grid(TABLE, "temperatures", self.temperatures, positive=True)


def unit_rows(features: numpy.ndarray) -> numpy.ndarray:
    """Rows scaled to unit length (float32), so a dot product is their cosine similarity."""
    rows = numpy.asarray(features, dtype=numpy.float32)
    return rows / numpy.maximum(numpy.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def store(normalizer: Normalizer, features: numpy.ndarray, labels: numpy.ndarray, num_classes: int) -> dict:
    """The payload that "fits" the head on (features, labels): the rows as the vote compares them."""
    return {
        "features": unit_rows(normalizer.apply(features)).astype(STORED_DTYPE),
        "labels": numpy.asarray(labels, dtype=numpy.int64),
        "normalizer": normalizer.state(),
        "num_classes": int(num_classes),
    }


def most_similar(similarities: numpy.ndarray, count: int) -> numpy.ndarray:
    """Per row, the columns of its `count` largest values, largest first, equal values in column order.

    A partial sort finds them; only rows where more columns tie at the cut than fit under it pay for a
    full stable sort, since the partial sort's pick among those columns follows no rule.
    """
    if count >= similarities.shape[1]:
        return numpy.argsort(-similarities, axis=1, kind="stable")
    chosen = numpy.argpartition(-similarities, count - 1, axis=1)[:, :count]
    values = numpy.take_along_axis(similarities, chosen, axis=1)
    cut = values.min(axis=1, keepdims=True)
    ambiguous = (similarities >= cut).sum(axis=1) > count
    order = numpy.take_along_axis(chosen, numpy.lexsort((chosen, -values)), axis=1)
    if ambiguous.any():
        order[ambiguous] = numpy.argsort(-similarities[ambiguous], axis=1, kind="stable")[:, :count]
    return order


def neighbours(queries: numpy.ndarray, stored: numpy.ndarray, count: int):
    """Per block of query rows: (similarities [rows, count], stored row indices [rows, count]), most similar first.

    `queries` are unit rows; equal similarities keep the earlier stored row first.
    """
    stored = stored.astype(numpy.float32)
    block = max(1, BLOCK_ELEMENTS // len(stored))
    for start in range(0, len(queries), block):
        similarities = queries[start : start + block] @ stored.T
        order = most_similar(similarities, count)
        yield numpy.take_along_axis(similarities, order, axis=1), order


def vote(similarities: numpy.ndarray, labels: numpy.ndarray, temperature: float, num_classes: int) -> numpy.ndarray:
    """Class probabilities [rows, classes] from each row's neighbours (most similar first) and their labels."""
    # Shifting by each row's top similarity changes no ratio of weights and keeps exp in range at small T.
    weights = numpy.exp((similarities - similarities[:, :1]).astype(numpy.float64) / temperature)
    votes = numpy.zeros((len(similarities), num_classes))
    rows = numpy.arange(len(similarities))
    for column in range(similarities.shape[1]):
        votes[rows, labels[:, column]] += weights[:, column]
    return votes / votes.sum(axis=1, keepdims=True)


def _grid(settings: KnnSettings, stored_rows: int) -> list[int]:
    """The k values tried, in the order given: each cut to the stored rows, dropping one the cut makes a repeat."""
    return list(dict.fromkeys(min(k, stored_rows) for k in settings.ks))


def select(settings: KnnSettings, problem: Problem) -> tuple[dict, list, dict]:
    """Best (normalization, k, T) by val accuracy; ties keep the earlier choice in the order given."""

    def trials():
        for kind in problem.normalizations:
            normalizer = Normalizer.fit(kind, problem.fit[0])
            payload = store(normalizer, *problem.fit, problem.num_classes)
            ks = _grid(settings, len(payload["labels"]))
            queries = unit_rows(normalizer.apply(problem.val[0]))
            found = list(neighbours(queries, payload["features"], max(ks)))
            similarities = numpy.concatenate([block[0] for block in found])
            labels = payload["labels"][numpy.concatenate([block[1] for block in found])]
            for k in ks:
                for temperature in settings.temperatures:
                    predictions = vote(similarities[:, :k], labels[:, :k], temperature, problem.num_classes)
                    top1 = accuracy(problem.val[1], predictions.argmax(axis=1))
                    choice = {"normalization": kind, "k": k, "temperature": temperature, "val_top1": top1}
                    yield choice, payload, {}

    chosen, payload, candidates = best_on_val(trials())
    return chosen, candidates, {**payload, "k": chosen["k"], "temperature": chosen["temperature"]}


def refit(settings: KnnSettings, chosen: dict, features, labels, num_classes: int, seed: int) -> tuple[dict, dict]:
    payload = store(Normalizer.fit(chosen["normalization"], features), features, labels, num_classes)
    return chosen, {**payload, "k": chosen["k"], "temperature": chosen["temperature"]}


def probabilities(payload: dict):
    normalizer = Normalizer.from_state(payload["normalizer"])
    stored, stored_labels = payload["features"], payload["labels"]
    k, temperature, num_classes = min(payload["k"], len(stored_labels)), payload["temperature"], payload["num_classes"]

    def knn(features: numpy.ndarray) -> numpy.ndarray:
        queries = unit_rows(normalizer.apply(features))
        blocks = [
            vote(similarities, stored_labels[indices], temperature, num_classes)
            for similarities, indices in neighbours(queries, stored, k)
        ]
        return numpy.concatenate(blocks) if blocks else numpy.zeros((0, num_classes))

    return knn


# --- the file: arrays as arrays, everything else as one JSON string (loads without pickle) -------------

ARRAYS = ("features", "labels")


def save(path, payload: dict) -> None:
    normalizer = payload["normalizer"]
    arrays = {name: payload[name] for name in ARRAYS}
    arrays.update(
        {f"normalizer_{name}": normalizer[name] for name in ("mean", "scale") if normalizer[name] is not None}
    )
    metadata = {name: value for name, value in payload.items() if name not in (*ARRAYS, "normalizer")}
    metadata["normalization"] = normalizer["kind"]
    with open(path, "wb") as handle:
        numpy.savez(handle, metadata=numpy.array(json.dumps(metadata)), **arrays)


def load(path) -> dict:
    with numpy.load(path, allow_pickle=False) as saved:
        metadata = json.loads(str(saved["metadata"]))
        statistics = {name: saved.get(f"normalizer_{name}") for name in ("mean", "scale")}
        normalizer = {"kind": metadata.pop("normalization"), **statistics}
        return {**{name: saved[name] for name in ARRAYS}, "normalizer": normalizer, **metadata}


def finite(payload: dict) -> bool:
    return bool(numpy.isfinite(payload["features"]).all())


KIND = HeadKind(
    name="knn",
    settings=KnnSettings,
    file_name="head.npz",
    select=select,
    refit=refit,
    save=save,
    load=load,
    probabilities=probabilities,
    finite=finite,
    remedy="the cached features hold values that are not finite: rebuild them (make invalidate STAGE=features)",
    deterministic=True,
)
