"""The state of every arm the config expects, read from the graph: its unit's key and build id, or why it is missing.

What the report's key records and what predict chooses from. Reads plans and manifests only; never builds.
"""

from __future__ import annotations

from . import cache
from .config import Config
from .graph import Graph, Unit
from .results import METHOD_NAMES, METHODS, RESULT, expected_arms


def planned_units(graph: Graph, stage: str) -> tuple[dict, str | None]:
    """{unit name: Unit} of a stage, or ({}, why there are none) - never raises, so no arm is dropped."""
    try:
        return {unit.name: unit for unit in graph.units(stage)}, None
    except Exception as error:  # a broken or unplannable stage must still leave its arms visible
        return {}, f"cannot plan stage {stage}: {error}"


def unit_state(graph: Graph, unit: Unit, stage: str, expected_file: str) -> dict:
    """Key, build id and (when not usable) the reason, of one upstream unit."""
    reason = graph.status(unit)
    if reason is None and not (graph.directory(unit) / expected_file).is_file():
        reason = f"{expected_file} is missing"
    if reason is not None:
        return {"key": unit.key, "build_id": None, "missing": f"{reason}; run make {stage}"}
    manifest = cache.read_manifest(graph.directory(unit))
    return {"key": unit.key, "build_id": manifest.get("build_id"), "missing": None}


def arm_states(config: Config, graph: Graph) -> list[dict]:
    """Plain-data state of every expected arm (goes into the report's key): where it is, or why it is missing."""
    planned = {method.stage: planned_units(graph, method.stage) for method in METHODS}
    states = []
    for spec in sorted(expected_arms(config), key=lambda arm: METHOD_NAMES.index(arm.method)):
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
            state.update(unit_state(graph, units[spec.unit], spec.stage, RESULT))
        states.append(state)
    return states
