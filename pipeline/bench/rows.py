"""One row of the table (its ratio and whether it met its target), and what every row family shares."""

from __future__ import annotations

import os
from pathlib import Path

from .. import backbones
from ..config import Config

PROJECT = Path(__file__).resolve().parents[2]


def make_row(
    section: str,
    what: str,
    ours,
    baseline,
    unit: str,
    target: str | None = None,
    rule: list | None = None,
    notes: str = "",
    **extra,
) -> dict:
    """One table row; `rule` is a list of (field, ">=" or "<=", number or field name) conditions that decide `met`."""
    ratio = ours / baseline if ours is not None and baseline else None
    row = {
        "section": section,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        "target": target,
        "rule": rule,
        "notes": notes,
        **extra,
    }
    row["met"] = rule_met(row)
    return row


def rule_met(row: dict) -> bool | None:
    """True/False from the row's rule; None when it has no rule or a value the rule needs is missing."""
    if not row.get("rule"):
        return None
    results = []
    for field, comparison, bound in row["rule"]:
        value = row.get(field)
        limit = row.get(bound) if isinstance(bound, str) else bound  # a string names another field
        if value is None or limit is None:
            return None
        results.append(value >= limit if comparison == ">=" else value <= limit)
    return all(results)


def weights_path(config: Config, name: str) -> str | None:
    """Local pretrained file of a backbone (fetched on first use, as the stages do); None for random-init ones."""
    spec = backbones.get_backbone(name)
    if spec.weights is None:
        return None
    return str(backbones.resolve_weights(spec, config.weights.get(name), allow_download=True))


def rows_of(jobs: list) -> int:
    return sum(len(job.paths) for job in jobs)


def subprocess_environment() -> dict:
    # The same code as this process, whatever the working directory.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
