"""Bootstrap intervals, paired comparisons and the per-image predictions file they read."""

from __future__ import annotations

import numpy
import pytest

from pipeline import cache, evaluate, integrity, results, statistics
from pipeline.evaluate import Predictions


def synthetic_run(generator, accuracy: float, images: int = 200, classes: int = 5, ids=None) -> Predictions:
    """A run whose images are each right with probability `accuracy`, independently."""
    labels = numpy.arange(images) % classes
    right = generator.random(images) < accuracy
    predicted = numpy.where(right, labels, (labels + 1) % classes)
    return Predictions.of(numpy.arange(1, images + 1) if ids is None else ids, labels, predicted)


def test_the_interval_covers_a_known_accuracy_at_about_the_nominal_rate():
    generator = numpy.random.default_rng(2024)
    truth, draws = 0.7, 200
    covered = {"test_top1": 0, "test_mean_per_class": 0}
    for draw in range(draws):
        run = synthetic_run(generator, truth)
        interval = statistics.arm_interval(run.labels, run.correct, resamples=1000, seed=draw)
        for name in covered:
            covered[name] += interval[name]["low"] <= truth <= interval[name]["high"]
    for name, count in covered.items():
        assert 0.90 <= count / draws <= 0.99, (name, count)


def test_the_interval_is_seeded_and_holds_its_estimate():
    run = synthetic_run(numpy.random.default_rng(1), 0.6)
    first = statistics.arm_interval(run.labels, run.correct, resamples=1000)
    assert first == statistics.arm_interval(run.labels, run.correct, resamples=1000)
    top1 = first["test_top1"]
    assert top1["estimate"] == pytest.approx(numpy.mean(run.correct))
    assert top1["low"] < top1["estimate"] < top1["high"]
    metrics = evaluate.classification_metrics(run.labels, run.predicted, 5)
    assert first["test_mean_per_class"]["estimate"] == pytest.approx(metrics["mean_per_class"])


def test_p_values_near_float_underflow_are_shown_as_a_bound():
    from pipeline.report_format import p_value

    assert p_value(0.0123) == "0.012" and p_value(3.6e-37) == "3.6e-37"
    tiny = statistics.mcnemar([1] * 1827 + [0] * 207, [0] * 1827 + [1] * 207)["p"]
    assert tiny < 1e-300 and p_value(tiny) == "< 1e-300"


def test_mcnemar_equals_the_hand_computed_exact_binomial_value():
    # 1 image only the first arm got right, 6 only the second, 3 both, 2 neither:
    # p = 2 * P(X <= 1 | n = 7, 1/2) = 2 * (1 + 7) / 2**7 = 0.125.
    first = [1] + [0] * 6 + [1] * 3 + [0] * 2
    second = [0] + [1] * 6 + [1] * 3 + [0] * 2
    test = statistics.mcnemar(first, second)
    assert test == {"first_only": 1, "second_only": 6, "p": pytest.approx(0.125, abs=1e-12)}
    assert statistics.mcnemar([0] * 5, [1] * 5)["p"] == pytest.approx(2 / 2**5, abs=1e-12)
    assert statistics.mcnemar([1, 0], [1, 0])["p"] == 1.0  # no discordant image


def test_an_arm_against_itself_differs_by_exactly_zero():
    runs = [synthetic_run(numpy.random.default_rng(3), 0.7)]
    pair = statistics.compare(runs, runs)
    assert (pair["difference"], pair["low"], pair["high"]) == (0.0, 0.0, 0.0)
    assert pair["mcnemar_p"] == 1.0 and not pair["resolved"]


def test_paired_comparisons_resolve_a_large_gap_and_mirror_when_swapped():
    generator = numpy.random.default_rng(4)
    runs = {"good": [synthetic_run(generator, 0.9)], "poor": [synthetic_run(generator, 0.4)]}
    figures = statistics.study_statistics(runs)
    forward = statistics.comparison(figures, "good", "poor")
    backward = statistics.comparison(figures, "poor", "good")
    assert forward["resolved"] and forward["low"] > 0
    assert backward["difference"] == -forward["difference"]
    assert (backward["low"], backward["high"]) == (-forward["high"], -forward["low"])
    assert backward["this_only_correct"] == forward["other_only_correct"]
    # Two arms one image apart on 200 images are not resolved.
    same = synthetic_run(generator, 0.7)
    flipped = Predictions.of(same.image_ids, same.labels, numpy.where(numpy.arange(200) == 0, 4, same.predicted))
    assert not statistics.compare([same], [flipped])["resolved"]


def test_runs_of_one_arm_combine_image_by_image_whatever_their_order():
    generator = numpy.random.default_rng(5)
    first = synthetic_run(generator, 0.7, images=50)
    second = synthetic_run(generator, 0.7, images=50)
    shuffle = generator.permutation(50)
    shuffled = Predictions.of(second.image_ids[shuffle], second.labels[shuffle], second.predicted[shuffle])
    ids, labels, correct = statistics.combine_runs([first, shuffled])
    assert numpy.array_equal(ids, first.image_ids) and numpy.array_equal(labels, first.labels)
    assert numpy.allclose(correct, (first.correct.astype(float) + second.correct) / 2)
    # The seed-averaged estimate is the mean of the runs' accuracies.
    interval = statistics.arm_interval(labels, correct, resamples=200)
    assert interval["test_top1"]["estimate"] == pytest.approx((first.correct.mean() + second.correct.mean()) / 2)


def test_annotate_writes_intervals_and_comparisons_and_leaves_arms_without_predictions_null():
    generator = numpy.random.default_rng(6)
    runs = {"a": [synthetic_run(generator, 0.8)], "b": [synthetic_run(generator, 0.5)]}
    records = [{"arm": arm, "status": "ok"} for arm in ("a", "b", "c")] + [{"arm": "d", "status": "missing"}]
    statistics.annotate(records, statistics.study_statistics(runs))
    a, b, c, d = records
    assert a["test_top1_low"] < 0.8 < a["test_top1_high"] and a["test_mean_per_class_low"] is not None
    assert set(a["comparisons"]) == {"b"} and set(b["comparisons"]) == {"a"}
    assert a["comparisons"]["b"]["difference"] == -b["comparisons"]["a"]["difference"]
    for record in (c, d):
        assert record["test_top1_low"] is None and record["test_top1_high"] is None and record["comparisons"] == {}


def test_predictions_file_round_trips_compactly_and_is_verified(tmp_path):
    labels = numpy.arange(120) % 102
    predicted = (labels + (numpy.arange(120) % 3 == 0)) % 102
    record = {"test_top1": float(numpy.mean(labels == predicted))}
    stored = Predictions.of(numpy.arange(5, 125), labels, predicted)
    evaluate.write_predictions(tmp_path, stored)
    assert evaluate.read_predictions(tmp_path) is None  # no manifest lists it: an arm from before predictions
    cache.write_manifest(tmp_path, {"files": [evaluate.PREDICTIONS], **_digests(tmp_path)})
    read = evaluate.read_predictions(tmp_path)
    assert read.labels.dtype == numpy.int16 and read.predicted.dtype == numpy.int16
    assert numpy.array_equal(read.image_ids, stored.image_ids) and read.correct.mean() == record["test_top1"]
    path = tmp_path / evaluate.PREDICTIONS
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(integrity.DamagedArtifact):
        evaluate.read_predictions(tmp_path)


def _digests(directory) -> dict:
    return {"digests": integrity.digests_of(directory, [evaluate.PREDICTIONS])}


def test_bad_predictions_are_refused_with_one_line():
    with pytest.raises(ValueError, match="one image id, label and prediction per image"):
        Predictions.of([1, 2], [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="test predicted must lie in 0..32767"):
        Predictions.of([1, 2], [0, 1], [0, 40000])
    with pytest.raises(ValueError, match="image ids repeat"):
        Predictions.of([1, 1], [0, 1], [0, 1])


def test_write_result_saves_predictions_that_match_the_record(tmp_path):
    run = synthetic_run(numpy.random.default_rng(7), 0.7)
    record = {**dict.fromkeys(results.REQUIRED_FIELDS), "method": "frozen", "test_top1": float(run.correct.mean())}
    predictions = {"labels": run.labels, "predictions": run.predicted, "image_ids": run.image_ids}
    evaluate.write_result(tmp_path, record, **predictions)
    assert (tmp_path / evaluate.PREDICTIONS).is_file() and (tmp_path / evaluate.RESULT).is_file()
    with pytest.raises(ValueError, match="together"):
        evaluate.write_result(tmp_path, record, labels=predictions["labels"])
    wrong = dict(record, test_top1=record["test_top1"] + 0.01)
    with pytest.raises(ValueError, match="the record test_top1"):
        evaluate.write_result(tmp_path, wrong, **predictions)
