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
import math
from dataclasses import dataclass
from pathlib import Path

from . import cache, plots, report_render
from .config import Config
from .evaluate import RESULT
from .graph import BuildContext, BuildResult, Stage, Unit, read_json, register_stage

CODE_VERSION = "3"
UNIT = "study"
MARKDOWN = "report.md"
HTML = "report.html"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
# Where each method's arms come from, in the order the report lists them.
METHOD_STAGES = {"scratch": "cnn", "frozen": "heads", "finetune": "finetune"}
# One results.json record per arm with these fields (results.csv columns, in this order;
# docs/results.md documents them).
RECORD_FIELDS = (
    "arm",
    "run",
    "status",
    "missing_reason",
    "method",
    "backbone",
    "head",
    "input_size",
    "train_images",
    "fit_on",
    "seed",
    "device",
    "precision",
    "val_top1",
    "test_top1",
    "test_mean_per_class",
    "extract_seconds",
    "train_seconds",
    "eval_seconds",
    "total_seconds",
    "images_per_second",
    "epochs_run",
    "selected",
    "weights_verified",
    "stage",
    "unit",
    "unit_key",
    "build_id",
)
# Per-arm statistics over seeds (summary.json, and the report's across-seeds table).
SUMMARY_JSON = "summary.json"
SUMMARY_METRICS = ("val_top1", "test_top1", "test_mean_per_class", "train_seconds", "total_seconds")


@dataclass(frozen=True)
class ArmSpec:
    """One run of an arm the config asks for (one per seed), and the stage unit that produces it."""

    arm: str
    run: str  # the arm's name, with -seed<N> for repeats after the first seed
    method: str
    stage: str
    unit: str
    backbone: str
    head: str
    seed: int


def expected_arms(config: Config) -> list[ArmSpec]:
    """Every run of the study under `config`: scratch CNN, frozen backbone x head kind, fine-tuned backbones,
    each once per seed (the units are named as their stages name them)."""
    architecture = config.cnn.architecture
    arms = [("scratch-" + architecture, "scratch", "cnn", architecture, architecture, "none")]
    for backbone in config.features.backbones:
        for kind in config.heads.kinds:
            arms.append((f"frozen-{backbone}-{kind}", "frozen", "heads", f"{backbone}-{kind}", backbone, kind))
    for backbone in config.finetune.backbones:
        arms.append((f"finetune-{backbone}", "finetune", "finetune", backbone, backbone, "softmax"))
    return [
        ArmSpec(arm, config.seeded_name(arm, seed), method, stage, config.seeded_name(unit, seed), backbone, head, seed)
        for arm, method, stage, unit, backbone, head in arms
        for seed in config.run_seeds()
    ]


def _planned_units(graph, stage: str) -> tuple[dict, str | None]:
    """{unit name: Unit} of a stage, or ({}, why there are none) - never raises, so no arm is dropped."""
    try:
        return {unit.name: unit for unit in graph.units(stage)}, None
    except Exception as error:  # a broken or unplannable stage must still leave its arms visible
        return {}, f"cannot plan stage {stage}: {error}"


def _unit_state(graph, unit: Unit, stage: str, expected_file: str) -> dict:
    """Key, build id and (when not usable) the reason, of one upstream unit."""
    reason = graph.status(unit)
    if reason is None and not (graph.directory(unit) / expected_file).is_file():
        reason = f"{expected_file} is missing"
    if reason is not None:
        return {"key": unit.key, "build_id": None, "missing": f"{reason}; run make {stage}"}
    manifest = cache.read_manifest(graph.directory(unit))
    return {"key": unit.key, "build_id": manifest.get("build_id"), "missing": None}


def arm_states(config: Config, graph) -> list[dict]:
    """Plain-data state of every expected arm (goes into the report's key): where it is, or why it is missing."""
    planned = {stage: _planned_units(graph, stage) for stage in METHOD_STAGES.values()}
    states = []
    for spec in sorted(expected_arms(config), key=lambda arm: list(METHOD_STAGES).index(arm.method)):
        units, problem = planned[spec.stage]
        state = {
            "arm": spec.arm,
            "run": spec.run,
            "seed": spec.seed,
            "method": spec.method,
            "stage": spec.stage,
            "unit": spec.unit,
            "backbone": spec.backbone,
            "head": spec.head,
        }
        if problem is not None:
            state.update(key=None, build_id=None, missing=problem)
        elif spec.unit not in units:
            state.update(
                key=None,
                build_id=None,
                missing=f"stage {spec.stage} plans no unit {spec.unit!r} (its units: {', '.join(units)})",
            )
        else:
            state.update(_unit_state(graph, units[spec.unit], spec.stage, RESULT))
        states.append(state)
    return states


def _samples_state(graph) -> dict:
    from .samples import GRID

    units, problem = _planned_units(graph, "samples")
    if problem is not None or not units:
        return {"unit": None, "key": None, "build_id": None, "missing": problem or "samples stage plans no unit"}
    unit = next(iter(units.values()))
    return {"unit": unit.name, **_unit_state(graph, unit, "samples", GRID)}


def plan(config: Config, graph) -> list[Unit]:
    settings = {"report": config.section("report"), "arms": arm_states(config, graph), "samples": _samples_state(graph)}
    return [Unit(stage="report", name=UNIT, code_version=CODE_VERSION, settings=settings)]


def _finite(value):
    """Numbers pass through; NaN/inf become None so JSON and tables stay valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def make_record(state: dict, result: dict | None, cache_root: Path) -> dict:
    """One results.json record: the arm's scalar fields (bulky arrays stay in the arm's own result.json)."""
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        arm=state["arm"],
        run=state.get("run", state["arm"]),
        seed=state.get("seed"),
        method=state["method"],
        backbone=state["backbone"],
        head=state["head"],
        stage=state["stage"],
        unit=state["unit"],
        unit_key=state["key"],
        build_id=state["build_id"],
    )
    if result is None:
        record.update(status="missing", missing_reason=state["missing"])
        return record
    for name in RECORD_FIELDS:
        if name in result:
            record[name] = _finite(result[name])
    record.update(status="ok", missing_reason=None, arm=result.get("arm", state["arm"]))
    record["result_path"] = str(cache.unit_dir(cache_root, state["stage"], state["unit"]) / RESULT)
    return record


def _load_arm(cache_root: Path, state: dict) -> tuple[dict | None, dict | None, dict]:
    """(result, manifest, state) of one arm; an unreadable result turns the arm into a missing one."""
    if state["missing"] is not None:
        return None, None, state
    directory = cache.unit_dir(cache_root, state["stage"], state["unit"])
    try:
        return read_json(cache.require_intact(directory / RESULT)), cache.read_manifest(directory) or {}, state
    except (OSError, ValueError, cache.CacheError) as error:
        return None, None, {**state, "missing": f"cannot read {directory / RESULT}: {error}"}


def _mean_and_sd(values: list) -> tuple:
    """(mean, sample standard deviation with n - 1, or None for a single value) of the values present."""
    present = [value for value in values if value is not None]
    if not present:
        return None, None
    mean = sum(present) / len(present)
    if len(present) < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in present) / (len(present) - 1))


def summarize(records: list[dict]) -> list[dict]:
    """One row per arm (in record order) with mean and sd over its present runs of every SUMMARY_METRICS."""
    arms: dict = {}
    for record in records:
        arms.setdefault(record["arm"], []).append(record)
    rows = []
    for arm, runs in arms.items():
        present = [run for run in runs if run["status"] == "ok"]
        row = {
            "arm": arm,
            "method": runs[0]["method"],
            "backbone": runs[0]["backbone"],
            "head": runs[0]["head"],
            "runs": len(present),
            "expected_runs": len(runs),
            "seeds": [run["seed"] for run in present],
        }
        for name in SUMMARY_METRICS:
            row[f"{name}_mean"], row[f"{name}_sd"] = _mean_and_sd([run[name] for run in present])
        rows.append(row)
    return rows


def best_arm(records: list[dict]) -> dict | None:
    """The first run of the arm with the highest mean val top-1 over its seeds (never test, so the choice
    does not peek at the test set)."""
    candidates = [row for row in summarize(records) if row["val_top1_mean"] is not None]
    best = max(candidates, key=lambda row: row["val_top1_mean"], default=None)
    if best is None:
        return None
    return next(
        record
        for record in records
        if record["arm"] == best["arm"] and record["status"] == "ok" and record["val_top1"] is not None
    )


def _write_csv(path: Path, records: list[dict]) -> None:
    buffer = io.StringIO()
    columns = list(RECORD_FIELDS) + ["result_path"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = {name: record.get(name) for name in columns}
        row["selected"] = json.dumps(row["selected"], sort_keys=True) if row["selected"] is not None else None
        writer.writerow({name: "" if value is None else value for name, value in row.items()})
    cache.write_text_atomic(path, buffer.getvalue())


def collect(context: BuildContext) -> report_render.Study:
    """Read every arm's result and manifest named in the unit's settings (nothing else) into a Study."""
    settings = context.unit.settings
    records, results, manifests = [], {}, {}
    for state in settings["arms"]:
        result, manifest, state = _load_arm(context.cache_root, state)
        record = make_record(state, result, context.cache_root)
        records.append(record)
        if result is not None:
            results[record["run"]], manifests[record["run"]] = result, manifest
    samples = settings["samples"]
    samples_directory = None
    if samples["missing"] is None:
        samples_directory = cache.unit_dir(context.cache_root, "samples", samples["unit"])
    return report_render.Study(
        title=settings["report"]["title"],
        records=records,
        results=results,
        manifests=manifests,
        best=best_arm(records),
        samples_directory=samples_directory,
        samples_missing=samples["missing"],
        options=context.config.report,
    )


def build(context: BuildContext) -> BuildResult:
    study = collect(context)
    images = plots.draw_all(study)
    files = []
    for name, png in images.items():
        cache.write_bytes_atomic(context.directory / name, png)
        files.append(name)
    cache.write_text_atomic(context.directory / MARKDOWN, report_render.render_markdown(study, images))
    cache.write_text_atomic(context.directory / HTML, report_render.render_html(study, images))
    cache.write_json_atomic(context.directory / RESULTS_JSON, study.records)
    cache.write_json_atomic(context.directory / SUMMARY_JSON, summarize(study.records))
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


def summary(graph) -> str:
    """The comparison table as plain text plus the report's path (what `make all` prints at the end)."""
    directory = graph.directory(graph.unit("report", UNIT))
    records = read_json(cache.require_intact(directory / RESULTS_JSON))
    return report_render.text_table(records) + f"\nreport: {directory / HTML}\n        {directory / MARKDOWN}"


STAGE = register_stage(
    Stage(
        name="report",
        description="Merge every arm's results and timings into the report.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
