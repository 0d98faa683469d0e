"""The arm (method x backbone x head) and its results: the one home of what the stages write and the report reads.

- the methods, in report order, each with the stage that runs its arms, whether it trains end to end,
  its plot style and the arms a config asks of it;
- arm and unit names (the stages name their units and records with these, and the report expects them);
- the schema of an arm's result.json (REQUIRED_FIELDS, check_result);
- the report's per-run record (RECORD_FIELDS, make_record) and its across-seeds summary (summarize, best_arm);
  pipeline/statistics.py adds the intervals and paired comparisons to the records.

Graph-free: pipeline/arms.py reads the graph for the state of each expected arm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .config import Config

RESULT = "result.json"
# Fields every arm's result.json carries (docs/results.md documents them).
REQUIRED_FIELDS = (
    "arm",
    "method",
    "backbone",
    "head",
    "input_size",
    "train_images",
    "fit_on",
    "seed",
    "device",
    "test_top1",
    "test_mean_per_class",
    "val_top1",
    "train_seconds",
    "extract_seconds",
    "eval_seconds",
    "total_seconds",
    "images_per_second",
    "per_class_accuracy",
    "confusion_matrix",
    "class_names",
    "selected",
)
# The arm's 95% bootstrap intervals (pipeline/statistics.py), the same in every run of the arm.
INTERVAL_FIELDS = ("test_top1_low", "test_top1_high", "test_mean_per_class_low", "test_mean_per_class_high")
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
    *INTERVAL_FIELDS,
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
SUMMARY_METRICS = ("val_top1", "test_top1", "test_mean_per_class", "train_seconds", "total_seconds")


# --- names -------------------------------------------------------------------------------------------

SCRATCH, FROZEN, FINETUNE = "scratch", "frozen", "finetune"  # the methods (METHODS below holds the rest)
SCRATCH_HEAD = "none"  # a scratch CNN's classifier is part of the network
FINETUNE_HEAD = "softmax"  # the backbone's replaced linear layer


def scratch_arm(architecture: str) -> str:
    return f"scratch-{architecture}"


def scratch_unit(architecture: str) -> str:
    return architecture


def frozen_arm(backbone: str, head: str) -> str:
    return f"frozen-{backbone}-{head}"


def frozen_unit(backbone: str, head: str) -> str:
    return f"{backbone}-{head}"


def finetune_arm(backbone: str) -> str:
    return f"finetune-{backbone}"


def finetune_unit(backbone: str) -> str:
    return backbone


# --- methods -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmId:
    """One arm a config asks for: its name, its stage unit's name (first seed), backbone and head."""

    name: str
    unit: str
    backbone: str
    head: str


@dataclass(frozen=True)
class Method:
    name: str
    stage: str  # the stage whose units produce this method's arms
    end_to_end: bool  # trains the whole network (has a per-epoch history and a model.pt)
    style: tuple[str, str]  # matplotlib colour and marker in the report's figures
    arms: Callable[[Config], list[ArmId]]  # the arms a config asks of this method


def _scratch_arms(config: Config) -> list[ArmId]:
    architecture = config.cnn.architecture
    return [ArmId(scratch_arm(architecture), scratch_unit(architecture), architecture, SCRATCH_HEAD)]


def _frozen_arms(config: Config) -> list[ArmId]:
    return [
        ArmId(frozen_arm(backbone, kind), frozen_unit(backbone, kind), backbone, kind)
        for backbone in config.features.backbones
        for kind in config.heads.kinds
    ]


def _finetune_arms(config: Config) -> list[ArmId]:
    return [
        ArmId(finetune_arm(backbone), finetune_unit(backbone), backbone, FINETUNE_HEAD)
        for backbone in config.finetune.backbones
    ]


# In the order the report lists them.
METHODS = (
    Method(SCRATCH, "cnn", True, ("tab:red", "s"), _scratch_arms),
    Method(FROZEN, "heads", False, ("tab:blue", "o"), _frozen_arms),
    Method(FINETUNE, "finetune", True, ("tab:green", "^"), _finetune_arms),
)
METHOD_NAMES = tuple(method.name for method in METHODS)
END_TO_END = tuple(method.name for method in METHODS if method.end_to_end)


def method(name: str) -> Method:
    for known in METHODS:
        if known.name == name:
            return known
    raise ValueError(f"method {name!r} is not one of {METHOD_NAMES}")


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
    """Every run of the study under `config`, method by method (METHODS order), each once per seed."""
    return [
        ArmSpec(
            arm.name,
            config.seeded_name(arm.name, seed),
            method.name,
            method.stage,
            config.seeded_name(arm.unit, seed),
            arm.backbone,
            arm.head,
            seed,
        )
        for method in METHODS
        for arm in method.arms(config)
        for seed in config.run_seeds()
    ]


# --- result.json -------------------------------------------------------------------------------------


def check_result(record: dict) -> None:
    """Raise ValueError unless `record` is a valid result.json: every required field, a known method."""
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"result record lacks {', '.join(missing)}")
    if record["method"] not in METHOD_NAMES:
        raise ValueError(f"method {record['method']!r} is not one of {METHOD_NAMES}")


# --- the report's records ----------------------------------------------------------------------------


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


def mean_and_sd(values: list) -> tuple:
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
            row[f"{name}_mean"], row[f"{name}_sd"] = mean_and_sd([run[name] for run in present])
        row.update({name: present[0].get(name) if present else None for name in INTERVAL_FIELDS})
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
