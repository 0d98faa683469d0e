"""The report's label-efficiency section: curve points read from the curves stage, their summary per
(arm, labels per class), the study's Pareto front of accuracy against time, and the section's blocks.

Like the rest of the report it reads only what the stage wrote (result.json and manifest.json) and
never trains; with the curves stage not run (or not registered) the section says so and why.
"""

from __future__ import annotations

from pathlib import Path

from . import cache
from .arms import planned_units, unit_state
from .graph import read_json
from .head_kinds import deterministic_kinds
from .report_format import MISSING, seconds, spread
from .results import RESULT, mean_and_sd, summarize

CURVES_IMAGE = "label_efficiency.png"  # the names plots.draw_all gives them
PARETO_IMAGE = "pareto_front.png"
CURVE_HEADERS = ["Arm", "Labels per class", "Train images", "Runs", "Test top-1 %", "Total s"]


def curve_states(graph) -> dict:
    """Plain data for the report's key: every planned curve unit's key and build id, or why there are none."""
    units, problem = planned_units(graph, "curves")
    if problem is not None:
        return {"problem": problem, "units": []}
    return {
        "problem": None,
        "units": [{"unit": name, **unit_state(graph, unit, "curves", RESULT)} for name, unit in units.items()],
    }


def collect_points(cache_root: Path, states: dict) -> tuple[list[dict], str | None]:
    """(one point per built curve unit, why the curves are absent or incomplete, or None)."""
    if states["problem"] is not None:
        return [], f"not run ({states['problem']})"
    points, missing = [], []
    for state in states["units"]:
        if state["missing"] is not None:
            missing.append(state["unit"])
            continue
        directory = cache.unit_dir(cache_root, "curves", state["unit"])
        try:
            result = read_json(cache.require_intact(directory / RESULT))
        except (OSError, ValueError, cache.CacheError):
            missing.append(state["unit"])
            continue
        points.append(
            {
                name: result.get(name)
                for name in (
                    "arm",
                    "method",
                    "head",
                    "labels_per_class",
                    "seed",
                    "train_images",
                    "test_top1",
                    "total_seconds",
                )
            }
        )
    if not states["units"]:
        return [], "not run (the config plans no curve points)"
    if not points:
        return [], "not run (run make curves)"
    note = f"{len(missing)} of {len(states['units'])} points not built (run make curves)" if missing else None
    return points, note


def curve_rows(points: list[dict]) -> list[dict]:
    """Mean and sd over seeds of each (arm, labels per class), in arm then label order."""
    groups: dict = {}
    for point in points:
        groups.setdefault((point["arm"], point["labels_per_class"]), []).append(point)
    rows = []
    for (arm, per_class), runs in sorted(groups.items()):
        top1, top1_sd = mean_and_sd([run["test_top1"] for run in runs])
        total, _ = mean_and_sd([run["total_seconds"] for run in runs])
        images, _ = mean_and_sd([run["train_images"] for run in runs])
        rows.append(
            {
                "arm": arm,
                "method": runs[0]["method"],
                "head": runs[0].get("head"),
                "labels_per_class": per_class,
                "train_images": images,
                "runs": len(runs),
                "test_top1_mean": top1,
                "test_top1_sd": top1_sd,
                "total_seconds_mean": total,
            }
        )
    return rows


def study_points(records: list[dict], rows: list[dict]) -> list[dict]:
    """Every (label, method, total seconds, test top-1) the study has: each arm, and each curve point below
    the full train split (n at the full split is the arm itself)."""
    points = [
        {
            "label": row["arm"],
            "method": row["method"],
            "seconds": row["total_seconds_mean"],
            "top1": row["test_top1_mean"],
            "curve_point": False,
        }
        for row in summarize(records)
    ]
    largest = max((row["labels_per_class"] for row in rows), default=None)
    points += [
        {
            "label": f"{row['arm']} @ {row['labels_per_class']}/class",
            "method": row["method"],
            "seconds": row["total_seconds_mean"],
            "top1": row["test_top1_mean"],
            "curve_point": True,
        }
        for row in rows
        if row["labels_per_class"] != largest
    ]
    return [point for point in points if (point["seconds"] or 0) > 0 and point["top1"] is not None]


def pareto_front(points: list[dict]) -> list[dict]:
    """The non-dominated points: no other point is at least as fast and as accurate, and better in one."""

    def dominates(other, point):
        return (
            other["seconds"] <= point["seconds"]
            and other["top1"] >= point["top1"]
            and (other["seconds"] < point["seconds"] or other["top1"] > point["top1"])
        )

    front = [point for point in points if not any(dominates(other, point) for other in points)]
    return sorted(front, key=lambda point: point["seconds"])


def section(study, images: dict) -> list:
    """The report's blocks for the curves and the Pareto front."""
    blocks = [("h2", "Label-efficiency curves")]
    if study.curves_note and not study.curve_rows:
        return blocks + [("p", f"Label-efficiency curves: {study.curves_note}.")]
    blocks.append(
        (
            "p",
            (
                "Each arm refitted on n labelled training images per class (nested, class-stratified subsets "
                "of the official train split, one draw per seed); hyper-parameters still chosen on the official "
                "val, test used once per point. Mean ± sd over seeds." + _deterministic_note(study.curve_rows)
            ),
        )
    )
    if study.curves_note:
        blocks.append(("p", f"Incomplete: {study.curves_note}."))
    if CURVES_IMAGE in images:
        blocks.append(("img", CURVES_IMAGE))
    blocks.append(("table", CURVE_HEADERS, [_table_row(row) for row in study.curve_rows]))
    if PARETO_IMAGE in images:
        front = pareto_front(study_points(study.records, study.curve_rows))
        blocks += [
            ("h2", "Accuracy against time: the Pareto front"),
            ("img", PARETO_IMAGE),
            (
                "p",
                "Non-dominated (no other arm or point is both faster and more accurate): "
                + ", ".join(point["label"] for point in front)
                + ".",
            ),
        ]
    return blocks


def _deterministic_note(rows: list[dict]) -> str:
    """Why some points have sd 0: at an n that reaches every class's train count every seed fits the same rows."""
    kinds = deterministic_kinds([row["head"] for row in rows])
    if not kinds:
        return ""
    return (
        f" Deterministic heads ({', '.join(kinds)}: nothing in their fit depends on the seed) give every seed "
        "the same result where n reaches every class's train count, since each seed's subset is then the "
        "whole train split: those points have sd 0, and are searched once (the search reused from the "
        "equal heads arm or seed)."
    )


def _table_row(row: dict) -> list[str]:
    images = MISSING if row["train_images"] is None else f"{row['train_images']:.0f}"
    return [
        row["arm"],
        str(row["labels_per_class"]),
        images,
        str(row["runs"]),
        spread(row["test_top1_mean"], row["test_top1_sd"], 100, 2),
        seconds(row["total_seconds_mean"]),
    ]
