"""The curves stage: label-efficiency curves, every trained arm again on n labelled training images per class.

One unit per frozen (backbone, head kind, n, seed), named "<backbone>-<kind>-n<N>-seed<S>", reading that
backbone's features unit, and with [curves] end_to_end one per end-to-end (arm, n, seed), named
"<method>-<arm unit>-n<N>-seed<S>", reading what that arm's own unit reads. One unit per point keeps
each point cached and resumable on its own, so an interrupted run rebuilds only the points it had not
finished and a new n adds only its own points.
Each seed draws its own nested, class-stratified subsets of the official train split (train only;
selection stays on the official val, test is touched once per point) and seeds the head as well.
The fit always uses the subset alone ([heads] fit_on is ignored: train+val would add val's labels).
Each point holds its arm's own unit settings plus the stage that builds the arm ("arm_stage"), and
is built by that stage's own build (heads, finetune or cnn) with the subset of the training images:
the recipe lives in one place. End-to-end points run in one process (the stage does not split work).
An end-to-end point on the whole train split is its arm's unit trained again (same rows, order, seed and
settings), so when that arm is cached and valid its verified files are copied instead of training.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy

from .. import atomic, cache, data, distributed, evaluate, integrity, results
from ..config import Config, ConfigError
from ..graph import BuildContext, BuildResult, Stage, Unit, get_stage, read_json, register_stage, stale_reason
from . import heads

CODE_VERSION = "3"  # 2: a point may reuse an equal unit's selection memo (result.json names it);
# 3: the arm stage's code version is in every point's key
# What a point's settings add to its arm unit's: without them they are the arm's own settings.
POINT_SETTINGS = ("arm_stage", "arm_code_version", "labels_per_class", "subset")
# Names the subset-drawing rule in every key, so a change to it can never reuse old points.
SUBSET_RULE = "nested-stratified-v1"
# Mixed into each seed so the subsets do not share a random stream with anything else seeded by it.
SUBSET_STREAM = 0x5EED_C0DE


def curve_seeds(config: Config) -> list[int]:
    """The seeds of each curve point: runtime.seed, runtime.seed + 1, ... ([curves] seeds of them)."""
    return [config.runtime.seed + index for index in range(config.curves.seeds)]


def curve_unit(backbone: str, kind: str, per_class: int, seed: int) -> str:
    return f"{results.frozen_unit(backbone, kind)}-n{per_class}-seed{seed}"


def subset_rows(labels, per_class: int, seed: int) -> numpy.ndarray:
    """Sorted row indices of `per_class` training images of every class (all of a class that has fewer).

    Each class's rows are shuffled once per seed and the first `per_class` kept, so for one seed the
    subset at n is inside the subset at every larger n (nested), and every class counts equally.
    Sorted, so at n >= every class's count the rows are the whole split in its own order.
    """
    labels = numpy.asarray(labels)
    if per_class < 1:
        raise ValueError(f"labels per class must be at least 1, got {per_class}")
    generator = numpy.random.default_rng([seed, SUBSET_STREAM])
    chosen = []
    for label in numpy.unique(labels):
        rows = numpy.flatnonzero(labels == label)
        chosen.append(generator.permutation(rows)[:per_class])
    return numpy.sort(numpy.concatenate(chosen)) if chosen else numpy.zeros(0, dtype=numpy.int64)


def _subset_config(config: Config) -> Config:
    """The config a curve point is built with: the final fit on the subset of train alone."""
    return dataclasses.replace(config, heads=dataclasses.replace(config.heads, fit_on="train"))


def _point(stage_unit: Unit, name: str, per_class: int) -> Unit:
    """A curve point of an arm's own unit: its settings, inputs and code version, plus the labels per class
    and the rule. The point is built by the arm's stage code, so a change to that code that rebuilds the
    arm rebuilds its points too."""
    return Unit(
        stage="curves",
        name=name,
        code_version=CODE_VERSION,
        settings={
            **stage_unit.settings,
            "arm_stage": stage_unit.stage,
            "arm_code_version": stage_unit.code_version,
            "labels_per_class": per_class,
            "subset": SUBSET_RULE,
        },
        inputs=stage_unit.inputs,
        seed=stage_unit.seed,
    )


def _end_to_end_points(config: Config, graph) -> list[Unit]:
    """Every end-to-end arm (results.METHODS) at each n and seed: the arm's own stage plans its units, with
    [curves] seeds repeats, and each becomes one point per n."""
    if distributed.active():
        raise ConfigError("[curves] end_to_end = true runs in one process; run make curves without NPROC")
    seeded = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, seeds=config.curves.seeds))
    units = []
    for method in results.METHODS:
        if not method.end_to_end:
            continue
        planned = {unit.name: unit for unit in get_stage(method.stage).plan(seeded, graph)}
        for arm in method.arms(config):
            for per_class in config.curves.labels_per_class:
                for seed in curve_seeds(config):
                    name = f"{method.name}-{arm.unit}-n{per_class}-seed{seed}"
                    units.append(_point(planned[seeded.seeded_name(arm.unit, seed)], name, per_class))
    return units


def plan(config: Config, graph) -> list[Unit]:
    units = []
    for backbone in config.features.backbones:
        features_unit = graph.unit("features", backbone)
        for kind in config.heads.kinds:
            for per_class in config.curves.labels_per_class:
                for seed in curve_seeds(config):
                    settings = heads.head_settings(_subset_config(config).with_seed(seed), kind)
                    frozen = Unit("heads", "", heads.CODE_VERSION, settings, (("features", features_unit),), seed)
                    units.append(_point(frozen, curve_unit(backbone, kind, per_class, seed), per_class))
    return units + (_end_to_end_points(config, graph) if config.curves.end_to_end else [])


def equal_point_folders(context: BuildContext) -> list[Path]:
    """Folders of the units that may have searched this frozen point's selection already: its arm's heads
    units (every seed) and its other curve points (every n and seed). Only a memo with this point's
    selection key is reused, and that key holds the fitted rows, the settings and, for a kind that is
    not deterministic, the seed: so in practice the whole-train points of one arm share one search."""
    arm = results.frozen_unit(context.unit.input("features").name, context.unit.settings["kind"])
    heads_root, curves_root = context.cache_root / heads.STAGE.name, context.cache_root / STAGE.name
    folders = [heads_root / arm, *sorted(heads_root.glob(f"{arm}-seed*")), *sorted(curves_root.glob(f"{arm}-n*-seed*"))]
    return [folder for folder in folders if folder != context.directory and folder.is_dir()]


def build(context: BuildContext) -> BuildResult:
    """Build the point with its arm's own stage build, on the subset of the training images."""
    settings, seed = context.unit.settings, context.config.runtime.seed
    per_class = settings["labels_per_class"]
    point = dataclasses.replace(context, config=_subset_config(context.config))
    options = {
        "choose_train": lambda labels: subset_rows(labels, per_class, seed),
        "extra": {"labels_per_class": per_class, "subset_seed": seed, "subset": SUBSET_RULE},
    }
    if settings["arm_stage"] == heads.STAGE.name:
        return heads.build(point, shared_memos=equal_point_folders(context), **options)
    reused = reuse_whole_train_arm(context, options["extra"])
    if reused is not None:
        return reused
    return get_stage(settings["arm_stage"]).build(point, **options)


def arm_key(unit: Unit) -> str:
    """The key of the arm unit this point is a subset run of: its settings without the point's own."""
    settings = {name: value for name, value in unit.settings.items() if name not in POINT_SETTINGS}
    return Unit(unit.settings["arm_stage"], "", unit.settings["arm_code_version"], settings, unit.inputs).key


def cached_arm_folder(context: BuildContext) -> Path | None:
    """The folder of this point's arm unit when it is built and valid for exactly this point's settings
    and inputs (the same input builds), else None."""
    key = arm_key(context.unit)
    inputs = {label: (upstream, context.input_directory(label)) for label, upstream in context.unit.inputs}
    stage_folder = context.cache_root / context.unit.settings["arm_stage"]
    for folder in sorted(stage_folder.iterdir()) if stage_folder.is_dir() else []:
        manifest = cache.read_manifest(folder) if folder.is_dir() else None
        if manifest is not None and manifest.get("key") == key and stale_reason(folder, key, inputs) is None:
            return folder
    return None


def reuse_whole_train_arm(context: BuildContext, extra: dict) -> BuildResult | None:
    """An end-to-end point on the whole train split is its arm: same rows in the same order, same seed and
    settings, so training it again would write the arm's files once more (tests/test_curves.py checks that).
    When that arm is cached and valid, its verified files are copied instead; None when it is not, and
    the point is trained."""
    labels = data.load_index(context.input_directory("download")).labels["train"]
    rows = subset_rows(labels, context.unit.settings["labels_per_class"], context.config.runtime.seed)
    if len(rows) != len(labels):
        return None
    folder = cached_arm_folder(context)
    if folder is None:
        return None
    manifest = cache.read_manifest(folder)
    for name in manifest["files"]:
        with atomic.atomic_path(context.directory / name) as temporary:
            shutil.copyfile(folder / name, temporary)
    # The copies must be the very bytes the arm's manifest vouches for (a concurrent rebuild of the arm
    # could have replaced a file since it was checked); otherwise train the point as usual.
    if integrity.verify_files(context.directory, manifest) is not None:
        context.log(f"[curves] {context.unit.name}: the arm {folder.name} changed while copied; training instead")
        return None
    reused_from = {"stage": manifest["stage"], "unit": manifest["unit"], "build_id": manifest["build_id"]}
    record = {**read_json(context.directory / evaluate.RESULT), **extra, "reused_from": reused_from}
    evaluate.write_result(context.directory, record)
    context.log(
        f"[curves] {context.unit.name}: the whole train split, i.e. the arm {manifest['stage']}/{manifest['unit']} "
        f"(build {manifest['build_id'][:8]}): its files reused, not trained again"
    )
    return BuildResult(
        files=list(manifest["files"]),
        metrics=manifest.get("metrics", {}),
        timings=manifest.get("timings", {}),
        extra={"reused_from": reused_from},
        environment=manifest.get("environment", {}),
    )


def workers(config: Config) -> int:
    """[curves] workers, resolved: the processes that build the frozen points side by side."""
    return config.curves.worker_count()


def frozen_point(unit: Unit) -> bool:
    """Whether a point may be built in a worker: a frozen head's, which runs as well on one torch thread;
    an end-to-end arm's training wants every core of its one process."""
    return unit.settings["arm_stage"] == heads.STAGE.name


STAGE = register_stage(
    Stage(
        name="curves",
        description="Label-efficiency curves: every trained arm at n labelled training images per class.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
        parallel_workers=workers,
        parallel_unit=frozen_point,
    )
)
