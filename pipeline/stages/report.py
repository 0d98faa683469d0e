"""The report stage: merge every arm's result and manifest into report.md/.html, results.csv/.json.

The report never trains. Its single unit ("study") does not declare the arms as runner inputs,
because the runner builds invalid inputs first; instead its settings record, for every arm the
config expects, that arm's current unit key and manifest build id (or why it is missing). So the
report stays cached while nothing changed and rebuilds as soon as an arm is (re)built, and an arm
that did not run is shown as missing with its reason instead of being dropped.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import (
    atomic,
    cache,
    errors,
    evaluate,
    plots,
    report_curves,
    report_format,
    report_render,
    statistics,
)
from ..arms import arm_states, planned_units, unit_state
from ..config import Config
from ..graph import BuildContext, BuildResult, Stage, Unit, read_json, register_stage
from ..report_render import HTML, MARKDOWN, RESULTS_CSV, RESULTS_JSON, SUMMARY_JSON, UNIT
from ..results import RECORD_FIELDS, RESULT, best_arm, make_record, summarize

CODE_VERSION = "6"  # 4: intervals, paired comparisons and the generated answer; 5: label-efficiency curves;
# 6: p-values below 1e-300 shown as a bound


def _samples_state(graph) -> dict:
    from .samples import GRID

    units, problem = planned_units(graph, "samples")
    if problem is not None or not units:
        return {"unit": None, "key": None, "build_id": None, "missing": problem or "samples stage plans no unit"}
    unit = next(iter(units.values()))
    return {"unit": unit.name, **unit_state(graph, unit, "samples", GRID)}


def plan(config: Config, graph) -> list[Unit]:
    settings = {
        "report": config.section("report"),
        "arms": arm_states(config, graph),
        "samples": _samples_state(graph),
        "curves": report_curves.curve_states(graph),
    }
    return [Unit(stage="report", name=UNIT, code_version=CODE_VERSION, settings=settings)]


def _load_arm(cache_root: Path, state: dict) -> tuple[dict | None, dict | None, dict]:
    """(result, manifest, state) of one arm; an unreadable result turns the arm into a missing one."""
    if state["missing"] is not None:
        return None, None, state
    directory = cache.unit_dir(cache_root, state["stage"], state["unit"])
    try:
        return read_json(cache.require_intact(directory / RESULT)), cache.read_manifest(directory) or {}, state
    except (OSError, ValueError, errors.CacheError) as error:
        return None, None, {**state, "missing": f"cannot read {directory / RESULT}: {error}"}


def _write_csv(path: Path, records: list[dict]) -> None:
    buffer = io.StringIO()
    columns = list(RECORD_FIELDS) + ["result_path"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = {name: record.get(name) for name in columns}
        row["selected"] = json.dumps(row["selected"], sort_keys=True) if row["selected"] is not None else None
        writer.writerow({name: "" if value is None else value for name, value in row.items()})
    atomic.write_text_atomic(path, buffer.getvalue())


def _load_predictions(cache_root: Path, records: list[dict]) -> tuple[dict, dict]:
    """({arm: [Predictions of its present runs, in seed order]}, {run: why it has none})."""
    runs_by_arm: dict = {}
    unpaired = {}
    for record in records:
        if record["status"] != "ok":
            continue
        directory = cache.unit_dir(cache_root, record["stage"], record["unit"])
        try:
            predictions = evaluate.read_predictions(directory)
        except (OSError, ValueError, KeyError, errors.CacheError) as error:
            unpaired[record["run"]] = f"cannot read {directory / evaluate.PREDICTIONS}: {error}"
            continue
        if predictions is None:
            unpaired[record["run"]] = "built before per-image predictions were saved"
        else:
            runs_by_arm.setdefault(record["arm"], []).append(predictions)
    return runs_by_arm, unpaired


def collect(context: BuildContext) -> report_format.Study:
    """Read every arm's result, manifest and predictions named in the unit's settings (nothing else) into
    a Study, its records holding each arm's intervals and paired comparisons."""
    settings = context.unit.settings
    records, results, manifests = [], {}, {}
    for state in settings["arms"]:
        result, manifest, state = _load_arm(context.cache_root, state)
        record = make_record(state, result, context.cache_root)
        records.append(record)
        if result is not None:
            results[record["run"]], manifests[record["run"]] = result, manifest
    runs_by_arm, unpaired = _load_predictions(context.cache_root, records)
    statistics.annotate(records, statistics.study_statistics(runs_by_arm))
    points, curves_note = report_curves.collect_points(context.cache_root, settings["curves"])
    samples = settings["samples"]
    samples_directory = None
    if samples["missing"] is None:
        samples_directory = cache.unit_dir(context.cache_root, "samples", samples["unit"])
    return report_format.Study(
        title=settings["report"]["title"],
        records=records,
        results=results,
        manifests=manifests,
        best=best_arm(records),
        samples_directory=samples_directory,
        samples_missing=samples["missing"],
        options=context.config.report,
        unpaired=unpaired,
        curve_rows=report_curves.curve_rows(points),
        curves_note=curves_note,
    )


def build(context: BuildContext) -> BuildResult:
    study = collect(context)
    images = plots.draw_all(study)
    files = []
    for name, png in images.items():
        atomic.write_bytes_atomic(context.directory / name, png)
        files.append(name)
    atomic.write_text_atomic(context.directory / MARKDOWN, report_render.render_markdown(study, images))
    atomic.write_text_atomic(context.directory / HTML, report_render.render_html(study, images))
    atomic.write_json_atomic(context.directory / RESULTS_JSON, study.records)
    atomic.write_json_atomic(context.directory / SUMMARY_JSON, summarize(study.records))
    _write_csv(context.directory / RESULTS_CSV, study.records)
    files += [MARKDOWN, HTML, RESULTS_JSON, SUMMARY_JSON, RESULTS_CSV]
    missing = [record["run"] for record in study.records if record["status"] != "ok"]
    context.log(
        f"[report] {len(study.records) - len(missing)} of {len(study.records)} runs present"
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + f"; wrote {context.directory / HTML}"
    )
    return BuildResult(
        files=files,
        metrics={"arms": len(study.records), "missing": missing, "best_arm": study.best["arm"] if study.best else None},
    )


STAGE = register_stage(
    Stage(
        name="report",
        description="Merge every arm's results and timings into the report.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
