"""How a setting is declared and checked: the documented field, the error a bad value raises, the checks
of one value, one section and its sub-tables.

Below pipeline/config.py (the study's sections, files and overrides) so that registries declaring
their own settings tables (the head kinds' `[heads.<kind>]`) need not import the config module that
reads them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, get_origin, get_type_hints

from .errors import PipelineError

# A field with this metadata holds sub-tables ([heads.softmax], ...): {table name: settings} built from the
# {name: settings dataclass} its function returns.
TABLES = "tables"


class ConfigError(PipelineError, ValueError):
    """A bad configuration file, key or value (message is one line and says what to fix)."""


def without_neutral_defaults(values: dict, neutral: dict) -> dict:
    """`values` as they enter a cache key: a setting listed in `neutral` is left out while it equals the
    default given there, a default that leaves every bit as before the setting existed, so adding it
    rebuilt no cached unit."""
    return {name: value for name, value in values.items() if not (name in neutral and value == neutral[name])}


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


def _check_list(section: str, key: str, value: Any, default: list) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"[{section}] {key} must be a list, got {value!r}")
    element_type = type(default[0]) if default else None
    checked = []
    for item in value:
        if element_type is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if element_type is not None and not isinstance(item, element_type):
            raise ConfigError(f"[{section}] {key} must be a list of {element_type.__name__}, got {value!r}")
        checked.append(item)
    return checked


def _check_value(section: str, spec: dataclasses.Field, value: Any, declared: Any) -> Any:
    key = spec.name
    meta = spec.metadata
    if declared is list or get_origin(declared) is list:
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else []
        value = _check_list(section, key, value, default)
    elif declared is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"[{section}] {key} must be true or false, got {value!r}")
    elif declared is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"[{section}] {key} must be an integer, got {value!r}")
    elif declared is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"[{section}] {key} must be a number, got {value!r}")
        value = float(value)
    elif declared is str:  # noqa: SIM102 - one branch per type as above; merged, a str value would fall through
        if not isinstance(value, str):
            raise ConfigError(f"[{section}] {key} must be a string, got {value!r}")
    choices = choices_of(meta)
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                raise ConfigError(f"[{section}] {key} = {item!r} is not valid; choose one of: {', '.join(choices)}")
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        # NaN compares false with every bound, so it would pass the range checks below.
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"[{section}] {key} = {number!r} is not a finite number; give a finite value")
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if meta.get("minimum") is not None and number < meta["minimum"]:
                raise ConfigError(f"[{section}] {key} = {number!r} is too small; it must be >= {meta['minimum']}")
            if meta.get("maximum") is not None and number > meta["maximum"]:
                raise ConfigError(f"[{section}] {key} = {number!r} is too large; it must be <= {meta['maximum']}")
    return value


def choices_of(metadata) -> tuple | None:
    """A field's valid values, asking the registry that holds them when they are given as a function."""
    choices = metadata.get("choices")
    return choices() if callable(choices) else choices


def tables_field_of(cls: type) -> dataclasses.Field | None:
    """The field of a section that holds its sub-tables, if it has one."""
    return next((spec for spec in dataclasses.fields(cls) if TABLES in spec.metadata), None)


def _unknown_key(section: str, key: str, fields: dict, tables: dict) -> ConfigError:
    """The error for a key a section does not have; a key that moved into a sub-table names its new place."""
    for table, cls in tables.items():
        moved = key.removeprefix(f"{table}_")
        if moved != key and moved in {spec.name for spec in dataclasses.fields(cls)}:
            return ConfigError(
                f"[{section}] {key} is now [{section}.{table}] {moved} (override: {section}.{table}.{moved}=...)"
            )
    known = ", ".join(fields) + "".join(f", [{section}.{table}]" for table in tables)
    return ConfigError(f"unknown key [{section}] {key}; known keys: {known}")


def build_section(section: str, cls: type, values: dict) -> Any:
    """Check one section's values (as read from TOML) and build its dataclass, sub-tables included; every
    sub-table is present, with its defaults when the values give none."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of settings, got {values!r}")
    tables_field = tables_field_of(cls)
    tables = tables_field.metadata[TABLES]() if tables_field else {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f is not tables_field}
    hints = get_type_hints(cls)
    for key in values:
        if key not in fields and key not in tables:
            raise _unknown_key(section, key, fields, tables)
    checked = {
        key: _check_value(section, fields[key], value, hints[key]) for key, value in values.items() if key in fields
    }
    if tables_field:
        checked[tables_field.name] = {
            name: build_section(f"{section}.{name}", table, values.get(name, {})) for name, table in tables.items()
        }
    return cls(**checked)
