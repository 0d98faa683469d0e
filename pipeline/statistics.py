"""How sure the study's numbers are: bootstrap intervals per arm and paired comparisons between arms.

Everything here reads per-image test predictions (pipeline/evaluate.py's Predictions), never trains.

- Interval of an arm: a 95% percentile bootstrap over test images (scipy.stats.bootstrap, RESAMPLES
  resamples from a generator seeded with SEED) of test top-1 and of mean per-class accuracy.
- Seeds: the runs of one arm are the same test images predicted several times. Each resample draws
  one set of image indices and applies it to every run, and the statistic is the mean over runs. As
  both accuracies are linear in per-image correctness, that equals resampling each image's
  correctness averaged over the runs, which is how it is computed. The interval therefore covers
  the test set's sampling only; the spread over seeds is the across-seeds table's.
- Paired comparison of two arms: the difference in test top-1 (one minus the other) with a paired
  bootstrap over the images both predicted (one resample, the same indices for both arms), and an
  exact McNemar test on the first runs of the two arms: the binomial test of the discordant images
  (one arm right, the other wrong) against an even split (scipy.stats.binomtest).
- Resolved: the paired interval excludes zero and McNemar's p is below 1 - CONFIDENCE.
"""

from __future__ import annotations

import numpy
from scipy import stats

from .evaluate import Predictions

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
INTERVAL_METHOD = "percentile"  # BCa's jackknife would cost one pass per test image (6,149)
_BATCH = 250  # resamples evaluated at once: memory ~ _BATCH x test images x 8 bytes per array


def combine_runs(runs: list[Predictions]) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(image ids, labels, correctness averaged over the runs) on the images every run predicted,
    sorted by image id; ValueError when runs disagree on an image's label."""
    if not runs:
        raise ValueError("no runs to combine")
    common = runs[0].image_ids
    for run in runs[1:]:
        common = numpy.intersect1d(common, run.image_ids)
    common = numpy.sort(common)
    labels, correct = None, numpy.zeros(len(common))
    for run in runs:
        by_id = numpy.argsort(run.image_ids)
        order = by_id[numpy.searchsorted(run.image_ids[by_id], common)]
        if labels is None:
            labels = run.labels[order].astype(numpy.int64)
        elif not numpy.array_equal(labels, run.labels[order]):
            raise ValueError("runs of one arm disagree on the labels of the same test images")
        correct += run.correct[order]
    return common, labels, correct / len(runs)


def _top1(correct, labels, axis=-1):
    return numpy.mean(correct, axis=axis)


def _top1_difference(difference, axis=-1):
    return numpy.mean(difference, axis=axis)


def _mean_per_class(correct, labels, axis=-1):
    """Mean over the classes present in each resample of its per-class accuracy (vectorised over resamples)."""
    correct, labels = numpy.atleast_2d(correct), numpy.atleast_2d(labels).astype(numpy.int64)
    classes = int(labels.max()) + 1
    rows = numpy.arange(len(labels))[:, None] * classes + labels  # one block of class slots per resample
    size = len(labels) * classes
    right = numpy.bincount(rows.ravel(), weights=correct.ravel(), minlength=size).reshape(len(labels), classes)
    shown = numpy.bincount(rows.ravel(), minlength=size).reshape(len(labels), classes)
    with numpy.errstate(invalid="ignore", divide="ignore"):
        accuracy = numpy.where(shown > 0, right / numpy.maximum(shown, 1), numpy.nan)
    return numpy.nanmean(accuracy, axis=-1)


def _accuracies(correct, labels, axis=-1):
    """[top-1, mean per-class] of each resample (rows of `correct`), or of the one sample given."""
    resamples = numpy.shape(correct)[:-1]
    return numpy.stack([_top1(correct, labels).reshape(resamples), _mean_per_class(correct, labels).reshape(resamples)])


def _bootstrap(data: tuple, statistic, resamples: int, seed: int, confidence: float):
    return stats.bootstrap(
        data,
        statistic,
        n_resamples=resamples,
        batch=_BATCH,
        vectorized=True,
        paired=True,
        confidence_level=confidence,
        method=INTERVAL_METHOD,
        rng=numpy.random.default_rng(seed),
    ).confidence_interval


def arm_interval(labels, correct, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> dict:
    """{test_top1, test_mean_per_class: {estimate, low, high}} of per-image correctness (0/1, or the mean
    over runs) by a percentile bootstrap over the images."""
    labels, correct = numpy.asarray(labels, dtype=numpy.int64), numpy.asarray(correct, dtype=float)
    if len(labels) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 test images, got {len(labels)}")
    interval = _bootstrap((correct, labels), _accuracies, resamples, seed, confidence)
    estimates = _accuracies(correct, labels)
    return {
        name: {"estimate": float(estimates[row]), "low": float(interval.low[row]), "high": float(interval.high[row])}
        for row, name in enumerate(("test_top1", "test_mean_per_class"))
    }


def paired_difference(
    correct_first, correct_second, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> dict:
    """{estimate, low, high} of top-1 (first) - top-1 (second) on the same images, paired bootstrap."""
    difference = numpy.asarray(correct_first, dtype=float) - numpy.asarray(correct_second, dtype=float)
    if len(difference) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 test images, got {len(difference)}")
    interval = _bootstrap((difference,), _top1_difference, resamples, seed, confidence)
    return {"estimate": float(difference.mean()), "low": float(interval.low), "high": float(interval.high)}


def mcnemar(correct_first, correct_second) -> dict:
    """Exact McNemar test: {first_only, second_only, p}, p two-sided (1.0 with no discordant image)."""
    first, second = numpy.asarray(correct_first, dtype=bool), numpy.asarray(correct_second, dtype=bool)
    first_only, second_only = int(numpy.sum(first & ~second)), int(numpy.sum(~first & second))
    discordant = first_only + second_only
    p = stats.binomtest(first_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"first_only": first_only, "second_only": second_only, "p": float(p)}


def compare(this: list[Predictions], other: list[Predictions], confidence: float = CONFIDENCE) -> dict:
    """Paired comparison of two arms (each a list of its runs, first seed first): the difference in test
    top-1 (this - other) with its interval on the images both predicted, McNemar on their first runs,
    and whether the difference is resolved."""
    ids_this, _, correct_this = combine_runs(this)
    ids_other, _, correct_other = combine_runs(other)
    common, in_this, in_other = numpy.intersect1d(ids_this, ids_other, return_indices=True)
    difference = paired_difference(correct_this[in_this], correct_other[in_other], confidence=confidence)
    _, in_this_run, in_other_run = numpy.intersect1d(this[0].image_ids, other[0].image_ids, return_indices=True)
    test = mcnemar(this[0].correct[in_this_run], other[0].correct[in_other_run])
    excludes_zero = difference["low"] > 0 or difference["high"] < 0
    return {
        "difference": difference["estimate"],
        "low": difference["low"],
        "high": difference["high"],
        "mcnemar_p": test["p"],
        "this_only_correct": test["first_only"],
        "other_only_correct": test["second_only"],
        "images": len(common),
        "resolved": bool(excludes_zero and test["p"] < 1 - confidence),
    }


def study_statistics(runs_by_arm: dict[str, list[Predictions]]) -> dict:
    """{"arms": {arm: {runs, images, test_top1, test_mean_per_class}}, "pairs": {(this, other): compare}}
    for every arm with predictions (arms in the given order; each unordered pair once, in that order)."""
    arms, pairs = {}, {}
    present = [arm for arm, runs in runs_by_arm.items() if runs]
    for arm in present:
        _, labels, correct = combine_runs(runs_by_arm[arm])
        arms[arm] = {"runs": len(runs_by_arm[arm]), "images": len(labels), **arm_interval(labels, correct)}
    for number, this in enumerate(present):
        for other in present[number + 1 :]:
            pairs[this, other] = compare(runs_by_arm[this], runs_by_arm[other])
    return {"arms": arms, "pairs": pairs}


def comparison(statistics: dict, this: str, other: str) -> dict | None:
    """The comparison of `this` arm against `other` (this - other), whichever order it was computed in."""
    pairs = statistics["pairs"]
    if (this, other) in pairs:
        return pairs[this, other]
    if (other, this) not in pairs:
        return None
    # The percentile interval of -d is the negated interval of d (the same resamples, mirrored).
    swapped = pairs[other, this]
    return {
        **swapped,
        "difference": -swapped["difference"],
        "low": -swapped["high"],
        "high": -swapped["low"],
        "this_only_correct": swapped["other_only_correct"],
        "other_only_correct": swapped["this_only_correct"],
    }


def annotate(records: list[dict], statistics: dict) -> None:
    """Write into every present run its arm's intervals (results.INTERVAL_FIELDS) and `comparisons`, the
    arm against every other arm with predictions ({other: difference this - other, ...}); the same in
    every run of an arm. Runs of an arm without predictions get nulls and {}."""
    for record in records:
        figures = statistics["arms"].get(record["arm"]) if record["status"] == "ok" else None
        for name in ("test_top1", "test_mean_per_class"):
            for end in ("low", "high"):
                record[f"{name}_{end}"] = figures[name][end] if figures else None
        record["comparisons"] = {}
        for other in statistics["arms"] if figures else ():
            if other != record["arm"]:
                record["comparisons"][other] = comparison(statistics, record["arm"], other)
