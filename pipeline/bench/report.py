"""Where the bench writes its report, and the report as a Markdown table with numbered notes."""

from __future__ import annotations

from .. import calibration

FOLDER = "bench"
RESULT = "bench.json"
PARTIAL = "bench.partial.json"


def _number(value, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def _machine(report: dict) -> list[str]:
    """The CPU the rows ran on, and the calibrated precisions in force there (none before a bench ends)."""
    environment = report.get("environment", {})
    if "cpu_model" not in environment:
        return []
    flags = " ".join(environment["cpu_flags"]) or "none of note"
    cpu = f"CPU: {environment['cpu_model']} ({environment['cpu_count']} cores; flags: {flags})"
    lines = [f"{cpu}; torch {environment['torch']}"]
    decisions = report.get("calibration") or {}
    if decisions:
        lines.append(
            "precision and engine = auto, decided here: "
            + "; ".join(
                f"{label}: {calibration.chosen(decision)} ({calibration.describe(decision)})"
                for label, decision in sorted(decisions.items())
            )
        )
    return [*lines, ""]


def _resolution(report: dict) -> list[str]:
    """Where the full-resolution images came from (nothing at the resolution given)."""
    resolution = report.get("resolution") or {}
    if resolution.get("mode") != "full":
        return []
    where = (
        "DATA_DIR's own, used as given"
        if resolution["source"] == "given"
        else f"synthesised from DATA_DIR ({resolution['synthesised']} made by this run) in {resolution['folder']}"
    )
    low, high = resolution["shorter_sides"]
    line = (
        f"Full resolution: {resolution['images']} images, {where}; mean {resolution['mean_kib']:.1f} KiB, "
        f"shorter side {low}-{high} px"
    )
    return [line, ""]


def format_table(report: dict) -> str:
    """The rows as a Markdown table with numbered notes below it, and where bench.json is."""
    lines = [
        *_machine(report),
        *_resolution(report),
        "| # | what | ours | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for number, row in enumerate(report["rows"], start=1):
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        if row.get("speedup"):
            ratio += f" ({row['speedup']:.1f}x faster)"
        if row.get("ours_test_top1") is not None:
            ratio += f"; test top-1 {row['ours_test_top1']:.3f} vs {row['baseline_test_top1']:.3f}"
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {number} | {row['what']} | {_number(row['ours'], row['unit'])} | "
            f"{_number(row['baseline'], row['unit'])} | {ratio} | {row['target'] or '-'} | {met} |"
        )
        notes.append(f"{number}. {row['notes']}")
    seconds = report.get("seconds")
    footer = []
    if seconds is not None:
        footer.append(
            f"bench: {seconds:.0f} s in all (load average {report['load_average_at_start']:.1f} at the "
            f"start, {report['load_average_at_end']:.1f} at the end); {report.get('path', '')}"
        )
    return "\n".join(lines + [""] + notes + [""] + footer)
