"""The warm row: `python -m stages.all` timed when every unit of the study is cached."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from ..config import Config
from .rows import make_row, subprocess_environment


def uncached_units(config: Config) -> list[str]:
    """Every unit of every stage `make all` would build under this config, with why; empty when all are valid."""
    from ..graph import Graph, stages

    graph = Graph(config, log=lambda line: None)
    pending = []
    for name in stages():
        for unit in graph.units(name):
            reason = graph.status(unit)
            if reason is not None:
                pending.append(f"{unit.stage}/{unit.name} ({reason})")
    return pending


# What the warm row runs (a module of stages/): `make all`.
STUDY_MODULE = "stages.all"


def warm_row(config: Config, arguments: list[str], timeout: float, log: Callable) -> dict:
    """Row 5: `python -m stages.all` with the same arguments, timed only when it has nothing to build."""
    what, target, rule = "warm `make all` (every stage cached)", "<= 10 s", [("ours", "<=", 10.0)]
    pending = uncached_units(config)
    if pending:
        return make_row(
            "warm",
            what,
            None,
            None,
            "s",
            target,
            rule,
            notes=f"not measured: {len(pending)} unit(s) not cached, e.g. {'; '.join(pending[:3])}; "
            "run `make all` with the same arguments first (bench never builds the study)",
        )
    command = [sys.executable, "-m", STUDY_MODULE, *arguments]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_environment())
    except subprocess.TimeoutExpired:
        return make_row(
            "warm", what, None, None, "s", target, rule, notes=f"not measured: still running after {timeout:.0f} s"
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return make_row(
            "warm",
            what,
            None,
            None,
            "s",
            target,
            rule,
            notes=f"not measured: stages.all exited {done.returncode} ({last})",
        )
    rebuilt = [line for line in done.stdout.splitlines() if ": building" in line]
    log(f"[bench] warm make all: {seconds:.1f} s")
    return make_row(
        "warm",
        what,
        seconds,
        None,
        "s",
        target,
        rule,
        notes="wall time of `python -m stages.all` in a subprocess (interpreter start and imports "
        "included), same config and overrides" + (f"; it rebuilt {len(rebuilt)} unit(s)!" if rebuilt else ""),
    )
