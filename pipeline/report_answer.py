"""The study's answer in words, generated from the records: which method is best, by how much with its
interval, whether that is resolved at this test-set size, and what it cost; one sentence per method
pair; and the matrices of paired comparisons. Reads only results.json records (with the intervals and
`comparisons` pipeline/statistics.py adds), so `make all` can print the answer from results.json."""

from __future__ import annotations

from .report_format import MISSING, p_value, percent, points, seconds
from .results import FINETUNE, FROZEN, METHOD_NAMES, SCRATCH, best_arm, summarize
from .statistics import CONFIDENCE, INTERVAL_METHOD, RESAMPLES, SEED

METHOD_WORDS = {SCRATCH: "training from scratch", FROZEN: "the frozen extractor", FINETUNE: "fine-tuning"}
# Each pair as (method, the method it is measured against): later in the study's order minus earlier.
METHOD_PAIRS = ((FROZEN, SCRATCH), (FINETUNE, FROZEN), (FINETUNE, SCRATCH))


def method_leaders(records: list[dict]) -> dict[str, dict]:
    """method -> the across-seeds row (results.summarize) of its best arm by val top-1, for methods present."""
    rows = {row["arm"]: row for row in summarize(records)}
    leaders = {}
    for method in METHOD_NAMES:
        best = best_arm([record for record in records if record["method"] == method])
        if best is not None:
            leaders[method] = rows[best["arm"]]
    return leaders


def comparison(records: list[dict], this: str, other: str) -> dict | None:
    """The paired comparison of arm `this` against arm `other` (this - other), None without predictions."""
    for record in records:
        if record["arm"] == this and record["status"] == "ok" and record.get("comparisons"):
            return record["comparisons"].get(other)
    return None


def verdict(pair: dict) -> str:
    """Whether a difference is resolved at this test-set size, and if not, why not."""
    size = f"at this test-set size ({pair['images']:,} images)"
    if pair["resolved"]:
        return f"resolved {size}"
    reasons = []
    if pair["low"] <= 0 <= pair["high"]:
        reasons.append("its interval includes zero")
    if pair["mcnemar_p"] >= 1 - CONFIDENCE:
        reasons.append(f"McNemar p ≥ {1 - CONFIDENCE:.2f}")
    return f"not resolved {size}: " + " and ".join(reasons)


def _amount(difference: float) -> str:
    if round(100 * difference, 2) == 0:
        return "level with"
    return f"{abs(100 * difference):.2f} points {'above' if difference > 0 else 'below'}"


def _evidence(pair: dict) -> str:
    p = p_value(pair["mcnemar_p"])
    return (
        f"paired {CONFIDENCE:.0%} interval {100 * pair['low']:+.2f} to {100 * pair['high']:+.2f} points; "
        f"McNemar p {p if p.startswith('<') else f'= {p}'} on {pair['this_only_correct']:,} against "
        f"{pair['other_only_correct']:,} discordant images"
    )


def _difference(records: list[dict], this: dict, other: dict) -> str:
    """`3.21 points above frozen-x (paired interval ...): resolved ...`, or the point difference and n/a."""
    pair = comparison(records, this["arm"], other["arm"])
    if pair is None:
        difference = this["test_top1_mean"] - other["test_top1_mean"]
        return (
            f"{_amount(difference)} {other['arm']} in test top-1 (paired interval and McNemar test {MISSING}: "
            "an arm without per-image predictions)"
        )
    return f"{_amount(pair['difference'])} {other['arm']} in test top-1 ({_evidence(pair)}): {verdict(pair)}"


def _cost(this: dict, other: dict) -> str:
    mine, theirs = this["total_seconds_mean"], other["total_seconds_mean"]
    if mine is None or theirs is None or theirs <= 0:
        return f"time {MISSING}"
    return f"{seconds(mine)} s against {seconds(theirs)} s, {mine / theirs:.2g} times the time"


def _interval_text(row: dict) -> str:
    if row["test_top1_low"] is None:
        return f"{MISSING}: no per-image predictions"
    return f"{percent(row['test_top1_low'])} to {percent(row['test_top1_high'])} %"


def answer(records: list[dict]) -> str:
    """The opening paragraph: the best method by val, its test top-1 with its interval, and its margin
    over every other method's best arm with the paired interval, the verdict and the time it cost."""
    leaders = method_leaders(records)
    best = best_arm(records)
    if best is None:
        return "No arm has results yet, so the study has no answer yet."
    method, winner = best["method"], leaders[best["method"]]
    runs = f" (mean of {winner['runs']} runs)" if winner["runs"] > 1 else ""
    sentences = [
        (
            f"Answer: {METHOD_WORDS[method]} is the best method here, judged by validation top-1. Its best arm, "
            f"{winner['arm']}, reaches {percent(winner['test_top1_mean'])} % test top-1{runs} "
            f"({CONFIDENCE:.0%} interval {_interval_text(winner)}) in {seconds(winner['total_seconds_mean'])} s."
        )
    ]
    for other_method, other in leaders.items():
        if other_method != method:
            sentences.append(
                f"Against {METHOD_WORDS[other_method]} it is {_difference(records, winner, other)}; "
                f"it took {_cost(winner, other)}."
            )
    if len(leaders) == 1:
        sentences.append("No other method has results, so there is nothing to compare it with.")
    return " ".join(sentences)


def method_pair_sentences(records: list[dict]) -> list[str]:
    """One sentence per method pair (scratch vs frozen, frozen vs fine-tuning, scratch vs fine-tuning),
    each between the two methods' best arms by val."""
    leaders = method_leaders(records)
    sentences = []
    for this_method, other_method in METHOD_PAIRS:
        title = f"{METHOD_WORDS[this_method].capitalize()} against {METHOD_WORDS[other_method]}"
        absent = [name for name in (this_method, other_method) if name not in leaders]
        if absent:
            sentences.append(f"{title}: {MISSING} (no {' or '.join(METHOD_WORDS[name] for name in absent)} arm).")
            continue
        this, other = leaders[this_method], leaders[other_method]
        sentences.append(f"{title}: {this['arm']} is {_difference(records, this, other)}.")
    return sentences


def comparison_blocks(records: list[dict]) -> list:
    """The method-pair sentences and the matrices of paired differences and McNemar p-values."""
    arms = [row["arm"] for row in summarize(records) if row["test_top1_low"] is not None]
    blocks = [
        ("h2", "Paired comparisons"),
        (
            "p",
            (
                "Each method's best arm by val top-1 against another's. A difference is resolved when its paired "
                f"{CONFIDENCE:.0%} bootstrap interval excludes zero and the exact McNemar test gives "
                f"p < {1 - CONFIDENCE:.2f}. With several seeds the interval averages each arm's runs image by "
                "image, and McNemar compares the arms' first runs."
            ),
        ),
        ("ul", method_pair_sentences(records)),
    ]
    if len(arms) < 2:
        return blocks + [("p", f"Matrices {MISSING}: fewer than two arms have per-image test predictions.")]
    numbered = [f"({number}) {arm}" for number, arm in enumerate(arms, 1)]
    headers = ["Arm", *(f"({number})" for number in range(1, len(arms) + 1))]

    def matrix(cell) -> list[list[str]]:
        return [
            [label, *("—" if this == other else cell(comparison(records, this, other)) for other in arms)]
            for label, this in zip(numbered, arms, strict=True)
        ]

    return blocks + [
        (
            "p",
            (
                f"Row minus column, in points of test top-1, with the paired {CONFIDENCE:.0%} bootstrap interval "
                "over the test images both arms predicted (the same resampled images for both):"
            ),
        ),
        ("table", headers, matrix(lambda pair: points(pair["difference"], pair["low"], pair["high"]))),
        ("p", "Exact McNemar p-value of each pair (first runs), on the images one arm got right and the other wrong:"),
        ("table", headers, matrix(lambda pair: p_value(pair["mcnemar_p"]))),
    ]


def intervals_note() -> str:
    """How the intervals were computed and how seeds combine."""
    return (
        f"Intervals: {CONFIDENCE:.0%} {INTERVAL_METHOD} bootstrap over the test images ({RESAMPLES:,} resamples, "
        f"generator seed {SEED}), of test top-1 and of mean per-class accuracy. With several seeds, each resample "
        "applies the same image indices to every run and averages the runs, so the interval covers the choice "
        "of test images, not the seed (the across-seeds table gives that spread). "
        f"{MISSING} marks an arm without per-image predictions."
    )
