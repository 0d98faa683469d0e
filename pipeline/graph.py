"""The stage graph and its runner.

A stage is data: a name, the stages it reads, a code version, a `plan` that lists its units for a
config (each with the settings that go into its key), and a `build` that writes one unit. The
runner walks the graph, skips every valid unit (saying so), builds invalid inputs first, holds a
lock per unit while building, and writes the manifest last.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import atomic, cache, distributed, integrity
from .config import Config
from .errors import PipelineError

# Modules that register stages, in graph order; imported on first use so `--help` stays fast.
STAGE_MODULES = [
    "pipeline.stages.download",
    "pipeline.stages.samples",
    "pipeline.stages.features",
    "pipeline.stages.heads",
    "pipeline.stages.finetune",
    "pipeline.stages.cnn",
    "pipeline.stages.curves",
    "pipeline.stages.report",
]


@dataclass(frozen=True)
class Unit:
    """One output of a stage for one config (e.g. the features of one backbone)."""

    stage: str
    name: str
    code_version: str
    settings: Any  # plain data hashed into the key
    inputs: tuple = ()  # (label, Unit) pairs this unit reads
    # The seed of a per-seed repeat (runtime.seeds > 1): its build sees the config with this seed.
    # Not part of the key by itself; stages put the seed into `settings`.
    seed: int | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return cache.compute_key(
            self.stage, self.code_version, self.settings, {label: unit.key for label, unit in self.inputs}
        )

    def input(self, label: str) -> Unit:
        for name, unit in self.inputs:
            if name == label:
                return unit
        raise KeyError(f"{self.stage}/{self.name} has no input {label!r}")


@dataclass
class BuildResult:
    """What a stage's build returns; the runner turns it into the manifest."""

    files: list
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    # Files that only serve to resume this build (checkpoints): deleted once the manifest is written,
    # so a kill between finishing and the manifest still resumes instead of starting over.
    discard_after_manifest: list = field(default_factory=list)


@dataclass
class BuildContext:
    config: Config
    unit: Unit
    directory: Path
    cache_root: Path
    log: Callable[[str], None]

    def input_directory(self, label: str) -> Path:
        unit = self.unit.input(label)
        return cache.unit_dir(self.cache_root, unit.stage, unit.name)


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    code_version: str
    plan: Callable[[Config, Graph], list]  # -> list[Unit]
    build: Callable[[BuildContext], BuildResult]
    # Under torchrun: True if every rank runs `build` (it splits the work itself and writes its final
    # files from rank 0); False if rank 0 builds alone while the others wait.
    distributed: bool = False
    # Worker processes that may build this stage's units side by side (Graph.run), for a config; None or a
    # result of 1: one after another in this process. Only for small units independent of each other whose
    # numbers do not depend on torch's thread count, since each worker computes on one torch thread.
    parallel_workers: Callable[[Config], int] | None = None
    # Which of its units may go to a worker; the others are built in this process afterwards. None: all.
    parallel_unit: Callable[[Unit], bool] | None = None


def stale_reason(directory: Path, key: str, inputs: dict) -> str | None:
    """None when the unit in `directory` is valid for `key` and was built from the current build of each
    input ({label: (input Unit, its folder)}), else why it must be rebuilt."""
    reason = cache.invalid_reason(directory, key)
    if reason is not None:
        return reason
    recorded = cache.read_manifest(directory).get("inputs", {})
    for label, (upstream, folder) in inputs.items():
        current = cache.read_manifest(folder) or {}
        if current.get("build_id") != recorded.get(label, {}).get("build_id"):
            return f"input {upstream.stage}/{upstream.name} was rebuilt"
    return None


class StageError(PipelineError, RuntimeError):
    """A stage that cannot run (unknown name, missing inputs)."""


_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    if stage.name in _REGISTRY:
        raise StageError(f"stage {stage.name!r} is registered twice")
    _REGISTRY[stage.name] = stage
    return stage


def stages() -> dict[str, Stage]:
    """Every registered stage, in graph order."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    # Graph order is STAGE_MODULES order, whatever order imports happened to register them in.
    order = [module.rsplit(".", 1)[1] for module in STAGE_MODULES]
    return dict(sorted(_REGISTRY.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def get_stage(name: str) -> Stage:
    known = stages()
    if name not in known:
        raise StageError(f"unknown stage {name!r}; valid stages: {', '.join(known)}")
    return known[name]


class Graph:
    """Plans units for one config and builds what is not valid."""

    def __init__(self, config: Config, cache_root: Path | None = None, log: Callable[[str], None] = print):
        self.config = config
        self.cache_root = Path(cache_root if cache_root is not None else config.cache.root)
        self.log = log
        self._plans: dict[str, list] = {}

    def units(self, stage_name: str) -> list:
        """The units `stage_name` has under this config (planned once per process)."""
        if stage_name not in self._plans:
            stage = get_stage(stage_name)
            self._plans[stage_name] = list(stage.plan(self.config, self))
        return self._plans[stage_name]

    def validate(self, stage_names) -> None:
        """Plan every named stage (and so its inputs) now, so a bad setting fails before any work starts.

        The plans are then forgotten: keys can change once the download stage has built (its data
        fingerprint), and plans made before that would carry stale input keys.
        """
        try:
            for name in stage_names:
                self.units(name)
        finally:
            self._plans.clear()

    def unit(self, stage_name: str, unit_name: str) -> Unit:
        for unit in self.units(stage_name):
            if unit.name == unit_name:
                return unit
        names = [unit.name for unit in self.units(stage_name)]
        raise StageError(f"stage {stage_name!r} has no unit {unit_name!r}; its units: {', '.join(names)}")

    def directory(self, unit: Unit) -> Path:
        return cache.unit_dir(self.cache_root, unit.stage, unit.name)

    def status(self, unit: Unit) -> str | None:
        """None when valid, else why it must be rebuilt.

        Besides the key, each input's build id must be the one this unit was built from, so an
        invalidated-and-rebuilt input rebuilds its dependents even when its settings did not change.
        """
        inputs = {label: (upstream, self.directory(upstream)) for label, upstream in unit.inputs}
        return stale_reason(self.directory(unit), unit.key, inputs)

    def run(self, stage_name: str, force: bool = False) -> list[dict]:
        """Make every unit of a stage valid (building invalid inputs first); returns their manifests."""
        stage = get_stage(stage_name)
        workers = 1 if stage.parallel_workers is None else stage.parallel_workers(self.config)
        # Under torchrun the ranks already share the machine, and they build each unit together.
        if workers > 1 and not distributed.active():
            return self._run_in_workers(stage, workers, force)
        return [self.ensure(unit, force=force) for unit in self.units(stage_name)]

    def _run_in_workers(self, stage: Stage, workers: int, force: bool) -> list[dict]:
        """run() with the stage's invalid units built by up to `workers` processes side by side.

        Inputs are made valid here first, so each is built once and no worker waits on another's
        lock; the units no worker may take, and those found valid, go the sequential way.
        """
        upstreams = {(up.stage, up.name): up for unit in self.units(stage.name) for _, up in unit.inputs}
        for upstream in upstreams.values():
            self.ensure(upstream)
        # Building an input can change keys (the download stage's data fingerprint); a worker plans afresh too.
        self._plans.clear()
        units = self.units(stage.name)
        allowed = {unit.name for unit in units if stage.parallel_unit is None or stage.parallel_unit(unit)}
        queued = [unit for unit in units if unit.name in allowed and (force or self.status(unit) is not None)]
        built = self._build_in_workers(queued, min(workers, len(queued)), force) if len(queued) > 1 else {}
        manifests = []
        for unit in units:
            if unit.name in built:
                manifests.append(built[unit.name])
            elif unit.name in allowed:  # its inputs are valid already: only the unit is checked (and said cached)
                manifests.append(self._ensure(unit, force, every_rank=False))
            else:
                manifests.append(self.ensure(unit, force=force))
        return manifests

    def _build_in_workers(self, units: list, workers: int, force: bool) -> dict[str, dict]:
        """Build `units` in a pool of `workers` processes; returns {unit name: manifest}.

        A failure starts no further unit (as a sequential run stops at its first), lets the running ones
        finish (they stay cached) and is raised here as the worker raised it, the first in plan order.
        An interrupt here stops every worker at once: their units, unfinished, are rebuilt next time.
        """
        import concurrent.futures
        import multiprocessing

        # Spawn, not fork: a forked child would inherit torch's thread pools (and any lock they hold) mid-state.
        context = multiprocessing.get_context("spawn")
        lines, stop = context.SimpleQueue(), context.Event()
        self.log(f"[{units[0].stage}] building {len(units)} units in {workers} worker processes")
        started = time.perf_counter()
        executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(self.config, self.cache_root, lines, stop)
        )

        def relay() -> None:
            while not lines.empty():
                self.log(lines.get())

        built, failures = {}, {}
        try:
            futures = {
                executor.submit(_build_in_worker, unit.stage, unit.name, unit.key, force): unit for unit in units
            }
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED
                )
                relay()
                for future in done:
                    if future.cancelled():
                        continue
                    if future.exception() is None:
                        built[futures[future].name] = future.result()
                        continue
                    failures[futures[future].name] = future.exception()
                    for waiting in pending:
                        waiting.cancel()
        except BaseException:
            stop.set()
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            relay()
        for unit in units:
            if unit.name in failures:
                raise failures[unit.name]
        # The units' own times overlap; this is the wall time the stage's user waited for them.
        self.log(f"[{units[0].stage}] built {len(units)} units in {time.perf_counter() - started:.1f} s")
        return built

    def ensure(self, unit: Unit, force: bool = False) -> dict:
        for _, upstream in unit.inputs:
            self.ensure(upstream)
        if not distributed.active():
            return self._ensure(unit, force, every_rank=False)
        if get_stage(unit.stage).distributed:
            return self._ensure(unit, force, every_rank=True)
        # A stage that does not split its work: rank 0 builds it, the others wait and read its manifest.
        manifest = self._ensure(unit, force, every_rank=False) if distributed.is_main() else None
        distributed.barrier()
        return manifest if manifest is not None else cache.read_manifest(self.directory(unit))

    def _ensure(self, unit: Unit, force: bool, every_rank: bool) -> dict:
        """Make one unit valid; with `every_rank`, all ranks build it together and rank 0's view decides."""
        directory = self.directory(unit)
        label = f"[{unit.stage}] {unit.name}"
        main = distributed.is_main()

        def status() -> str | None:
            # Rank 0 reads the cache; the other ranks of a splitting stage take its answer.
            reason = None if force or not main else self.status(unit)
            return distributed.broadcast(reason) if every_rank else reason

        if not force and status() is None:
            self.log(f"{label}: cached (key {unit.key[:8]})")
            return cache.read_manifest(directory)
        # Only rank 0 takes the lock: it keeps separate runs apart, and the ranks of one run build together.
        lock = (
            cache.unit_lock(directory, self.config.cache.lock_timeout_seconds, announce=self.log)
            if main
            else contextlib.nullcontext()
        )
        with lock:
            reason = status()
            if not force and reason is None:  # another run finished it while we waited
                self.log(f"{label}: cached (built by another run, key {unit.key[:8]})")
                return cache.read_manifest(directory)
            self.log(f"{label}: building ({reason or 'forced'})")
            if main:
                cache.invalidate(directory)
                if force:
                    cache.drop_memos(directory)
                atomic.sweep_temporary_files(directory)
                atomic.sweep_temporary_files(directory / cache.MEMO)
            if every_rank:
                distributed.barrier()  # the folder is clean before any rank writes into it
            stage = get_stage(unit.stage)
            started = time.perf_counter()
            config = self.config if unit.seed is None else self.config.with_seed(unit.seed)
            result = stage.build(BuildContext(config, unit, directory, self.cache_root, self.log))
            elapsed = time.perf_counter() - started
            # Some keys depend on what the build produced (the download stage's data fingerprint).
            self._plans.pop(unit.stage, None)
            final = self.unit(unit.stage, unit.name)
            if main:
                self._write_manifest(
                    directory, unit, final, result, config, elapsed, distributed.world_size() if every_rank else 1
                )
                self.log(f"{label}: done in {elapsed:.1f} s")
            if every_rank:
                distributed.barrier()  # the manifest exists before any rank reads it
            return cache.read_manifest(directory)

    def _write_manifest(
        self,
        directory: Path,
        unit: Unit,
        final: Unit,
        result: BuildResult,
        config: Config,
        elapsed: float,
        processes: int,
    ) -> None:
        manifest = {
            "stage": unit.stage,
            "unit": unit.name,
            "key": final.key,
            "code_version": unit.code_version,
            "settings": final.settings,
            "build_id": uuid.uuid4().hex,
            "inputs": {
                name: {
                    "stage": up.stage,
                    "unit": up.name,
                    "key": up.key,
                    "build_id": (cache.read_manifest(self.directory(up)) or {}).get("build_id"),
                }
                for name, up in final.inputs
            },
            "files": list(result.files),
            "metrics": result.metrics,
            "timings": {**result.timings, "stage_seconds": elapsed},
            "extra": result.extra,
            "environment": result.environment,
            "config": config.to_dict(),
            "config_source": config.source,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if processes > 1:
            manifest["world_size"] = processes  # built by this many torchrun processes together
        # Recorded now, as the unit is finished: every later reader checks its files against these.
        manifest["digests"] = integrity.digests_of(directory, manifest["files"])
        cache.write_manifest(directory, manifest)
        for name in result.discard_after_manifest:
            (directory / name).unlink(missing_ok=True)

    def invalidate(self, stage_name: str) -> list[str]:
        """Drop the manifest and memos of every unit of a stage (whatever its key); dependents rebuild via build ids."""
        get_stage(stage_name)
        folder = self.cache_root / stage_name
        dropped = []
        if folder.is_dir():
            for directory in sorted(path for path in folder.iterdir() if path.is_dir()):
                with cache.unit_lock(directory, self.config.cache.lock_timeout_seconds, announce=self.log):
                    had_memos = cache.drop_memos(directory)
                    if cache.invalidate(directory) or had_memos:
                        dropped.append(directory.name)
        return dropped


# The graph of a worker process (Graph._build_in_workers), set up once by _start_worker.
_worker_graph: Graph | None = None


def _start_worker(config: Config, cache_root: Path, lines, stop) -> None:
    """Set up a worker process: one torch thread, its own graph logging through `lines`, and an exit
    as soon as the parent sets `stop` or is gone."""
    global _worker_graph
    import signal
    import threading

    import torch

    # The workers together use the cores one sequential build would: one torch thread each. Numpy's BLAS
    # keeps its default, as in a sequential build, since its rounding depends on its thread count.
    torch.set_num_threads(1)
    # Ctrl-C is the parent's to handle (it sets `stop`), so an idle worker prints no traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_on_stop, args=(stop, os.getppid()), daemon=True).start()
    _worker_graph = Graph(config, cache_root, log=lines.put)


def _exit_on_stop(stop, parent: int) -> None:
    """End the worker at once when told or orphaned (its parent killed): like a killed sequential run, the
    unit it was building has no manifest and is rebuilt next time, and its lock goes with the process."""
    while not stop.wait(1.0) and os.getppid() == parent:
        pass
    os._exit(1)


def _build_in_worker(stage_name: str, unit_name: str, key: str, force: bool) -> dict:
    """Make one unit valid in a worker (its inputs are valid already); returns its manifest."""
    unit = _worker_graph.unit(stage_name, unit_name)
    if unit.key != key:  # the worker must build exactly what the parent found invalid
        raise StageError(
            f"[{stage_name}] {unit_name}: a worker process planned key {unit.key[:8]}, the run {key[:8]}; "
            "rerun with one worker"
        )
    return _worker_graph._ensure(unit, force, every_rank=False)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
