"""How a setting is declared: the documented field, the error a bad value raises, a grid's own check.

Below pipeline/config.py so that registries declaring their own settings tables (the head kinds'
`[heads.<kind>]`) need not import the config module that reads them.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from .errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A bad configuration file, key or value (message is one line and says what to fix)."""


def setting(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
):
    """A dataclass field with its documentation and constraints attached as metadata.

    `choices` may be a function returning them, for choices a registry holds (read when checked).
    """
    metadata = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_grid(table: str, key: str, values: list, *, positive: bool = False) -> None:
    """A list of candidates tried on val: at least one, and each > 0 when `positive`."""
    if not values:
        raise ConfigError(f"[{table}] {key} must list at least one value")
    if positive and any(value <= 0 for value in values):
        raise ConfigError(f"[{table}] {key} values must be > 0, got {values!r}")
