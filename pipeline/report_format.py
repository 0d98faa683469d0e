"""What the report shows (Study), how its numbers are written, and its tables (comparison, details,
across seeds, the terminal table). Fixed decimals, so each cell maps back to the exact input."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ReportConfig
from .results import summarize

MISSING = "n/a"


@dataclass
class Study:
    """Everything the report shows, read from results, manifests and predictions only."""

    title: str
    records: list  # results.json records, one per expected run (arm x seed), with their intervals
    results: dict  # run -> its full result.json (present runs only)
    manifests: dict  # run -> its manifest.json
    best: dict | None  # record of the arm with the best val top-1
    samples_directory: Path | None
    samples_missing: str | None
    options: ReportConfig | None = None
    unpaired: dict = field(default_factory=dict)  # run -> why it has no per-image predictions
    # Label-efficiency curves (pipeline/report_curves): a row per (arm, labels per class), and why they
    # are absent or incomplete (None when every planned point is built).
    curve_rows: list = field(default_factory=list)
    curves_note: str | None = None


def percent(value) -> str:
    """A 0-1 fraction as a percentage with two decimals (n/a when absent)."""
    return MISSING if value is None else f"{100 * value:.2f}"


def seconds(value) -> str:
    """Seconds (or images per second) with one decimal (n/a when absent)."""
    return MISSING if value is None else f"{value:.1f}"


def plain(value) -> str:
    """Any other value as text (n/a when absent)."""
    return MISSING if value is None else str(value)


def interval(low, high) -> str:
    """`[70.10, 72.35]`: an interval of fractions in percent (n/a when absent)."""
    return MISSING if low is None or high is None else f"[{percent(low)}, {percent(high)}]"


def with_interval(value, low, high) -> str:
    """`71.23 [70.10, 72.35]`: a fraction and its interval in percent (`71.23 [n/a]` without an interval)."""
    if value is None:
        return MISSING
    return f"{percent(value)} {interval(low, high) if low is not None and high is not None else f'[{MISSING}]'}"


def points(value, low, high) -> str:
    """A difference of fractions in signed percentage points with its interval: `+3.21 [+1.10, +5.02]`."""
    return f"{100 * value:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def p_value(p: float) -> str:
    """Three decimals, or two significant digits below 0.001; `< 1e-300` below that, where the binomial
    tail nears float64's smallest numbers and its digits are underflow, not the tail's."""
    if p >= 0.001:
        return f"{p:.3f}"
    return f"{p:.1e}" if p >= 1e-300 else "< 1e-300"


def spread(mean, sd, scale: float, decimals: int) -> str:
    """`mean ± sd` (sd left out for a single run, n/a when absent)."""
    if mean is None:
        return MISSING
    text = f"{scale * mean:.{decimals}f}"
    return text if sd is None else f"{text} ± {scale * sd:.{decimals}f}"


def run_name(record: dict) -> str:
    return record.get("run") or record["arm"]


# --- the comparison table: one row per arm, the columns that answer the question ---------------------

COMPARISON_HEADERS = [
    "Arm",
    "Test top-1 % [95% interval]",
    "Test mean per-class % [95% interval]",
    "Total s",
]


def comparison_rows(records: list[dict]) -> list[list[str]]:
    """One row per arm: test top-1 and mean per-class (mean over its runs) with their bootstrap
    intervals, and its total seconds (mean over its runs)."""
    return [
        [
            row["arm"],
            with_interval(row["test_top1_mean"], row["test_top1_low"], row["test_top1_high"]),
            with_interval(
                row["test_mean_per_class_mean"], row["test_mean_per_class_low"], row["test_mean_per_class_high"]
            ),
            seconds(row["total_seconds_mean"]),
        ]
        for row in summarize(records)
    ]


# --- the details tables: one row per run ---------------------------------------------------------------

SETUP_HEADERS = ["Run", "Method", "Backbone", "Head", "Input px", "Train images", "Fit on", "Seed", "Device", "Status"]
SCORES_HEADERS = [
    "Run",
    "Val top-1 %",
    "Test top-1 %",
    "Test mean per-class %",
    "Extract s",
    "Train s",
    "Eval s",
    "Total s",
    "Images/s",
]


def setup_row(record: dict) -> list[str]:
    return [
        run_name(record),
        record["method"],
        plain(record["backbone"]),
        plain(record["head"]),
        plain(record["input_size"]),
        plain(record["train_images"]),
        plain(record["fit_on"]),
        plain(record["seed"]),
        plain(record["device"]),
        record["status"],
    ]


def scores_row(record: dict) -> list[str]:
    return [
        run_name(record),
        percent(record["val_top1"]),
        percent(record["test_top1"]),
        percent(record["test_mean_per_class"]),
        seconds(record["extract_seconds"]),
        seconds(record["train_seconds"]),
        seconds(record["eval_seconds"]),
        seconds(record["total_seconds"]),
        seconds(record["images_per_second"]),
    ]


SUMMARY_HEADERS = ["Arm", "Runs", "Seeds", "Val top-1 %", "Test top-1 %", "Test mean per-class %", "Train s", "Total s"]


def summary_rows(records: list[dict]) -> list[list[str]]:
    """The across-seeds table, or [] when every arm ran once (then the comparison table says it all)."""
    rows = summarize(records)
    if all(row["expected_runs"] < 2 for row in rows):
        return []
    return [
        [
            row["arm"],
            f"{row['runs']} of {row['expected_runs']}",
            ", ".join(map(str, row["seeds"])) or MISSING,
            spread(row["val_top1_mean"], row["val_top1_sd"], 100, 2),
            spread(row["test_top1_mean"], row["test_top1_sd"], 100, 2),
            spread(row["test_mean_per_class_mean"], row["test_mean_per_class_sd"], 100, 2),
            spread(row["train_seconds_mean"], row["train_seconds_sd"], 1, 1),
            spread(row["total_seconds_mean"], row["total_seconds_sd"], 1, 1),
        ]
        for row in rows
    ]


# --- the terminal ----------------------------------------------------------------------------------------


def aligned(headers: list, rows: list) -> list[str]:
    """Fixed-width lines: first column left-aligned, the others right-aligned, a rule under the headers."""
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]

    def line(cells: list) -> str:
        return "  ".join(
            str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(headers), "  ".join("-" * width for width in widths), *map(line, rows)]


def text_table(records: list[dict]) -> str:
    """The comparison table for a terminal: fixed-width columns, missing arms marked with their reason."""
    headers = [
        "arm",
        "val top-1 %",
        "test top-1 %",
        "95% interval",
        "mean/class %",
        "extract s",
        "train s",
        "eval s",
        "total s",
        "images/s",
    ]
    rows = [
        [
            run_name(r),
            percent(r["val_top1"]),
            percent(r["test_top1"]),
            interval(r.get("test_top1_low"), r.get("test_top1_high")),
            percent(r["test_mean_per_class"]),
            seconds(r["extract_seconds"]),
            seconds(r["train_seconds"]),
            seconds(r["eval_seconds"]),
            seconds(r["total_seconds"]),
            seconds(r["images_per_second"]),
        ]
        for r in records
    ]
    lines = aligned(headers, rows)
    lines += [f"missing: {run_name(r)}: {r['missing_reason']}" for r in records if r["status"] != "ok"]
    lines += [
        f"unverified weights: {run_name(r)} (its weights file is not the published one)"
        for r in records
        if r.get("weights_verified") == "no"
    ]
    summary = summary_rows(records)
    if summary:
        lines += ["", "across seeds (mean ± sd):", *aligned(SUMMARY_HEADERS, summary)]
    return "\n".join(lines)
