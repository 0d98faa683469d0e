"""The curves stage: label-efficiency curves, every frozen arm refitted on n labelled training images per class.

One unit per (backbone, head kind, n, seed), named "<backbone>-<kind>-n<N>-seed<S>", reading that
backbone's features unit: one unit per point keeps each point cached and resumable on its own, so an
interrupted run rebuilds only the points it had not finished and a new n adds only its own points.
Each seed draws its own nested, class-stratified subsets of the official train split (train only;
selection stays on the official val, test is touched once per point) and seeds the head as well.
The fit always uses the subset alone ([heads] fit_on is ignored: train+val would add val's labels).
A unit is built by the heads stage's own build (pipeline/heads.build_frozen) on the subset's rows.

[curves] end_to_end (finetune and cnn on the subsets) is a switch reserved for that work; it is not
built yet and stops with a clear error when turned on.
"""

from __future__ import annotations

import dataclasses

import numpy

from . import heads, results
from .config import Config, ConfigError
from .graph import BuildContext, BuildResult, Stage, Unit, register_stage

CODE_VERSION = "1"
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


def plan(config: Config, graph) -> list[Unit]:
    if config.curves.end_to_end:
        raise ConfigError(
            "[curves] end_to_end = true is not built yet (only the frozen arms have curves); set it to false"
        )
    units = []
    for backbone in config.features.backbones:
        features_unit = graph.unit("features", backbone)
        for kind in config.heads.kinds:
            for per_class in config.curves.labels_per_class:
                for seed in curve_seeds(config):
                    settings = heads.head_settings(_subset_config(config).with_seed(seed), kind)
                    units.append(
                        Unit(
                            stage="curves",
                            name=curve_unit(backbone, kind, per_class, seed),
                            code_version=CODE_VERSION,
                            settings={**settings, "labels_per_class": per_class, "subset": SUBSET_RULE},
                            inputs=(("features", features_unit),),
                            seed=seed,
                        )
                    )
    return units


def build(context: BuildContext) -> BuildResult:
    per_class, seed = context.unit.settings["labels_per_class"], context.config.runtime.seed
    return heads.build_frozen(
        dataclasses.replace(context, config=_subset_config(context.config)),
        choose_train=lambda labels: subset_rows(labels, per_class, seed),
        extra={"labels_per_class": per_class, "subset_seed": seed, "subset": SUBSET_RULE},
        stage="curves",
    )


STAGE = register_stage(
    Stage(
        name="curves",
        description="Label-efficiency curves: every frozen arm at n labelled training images per class.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
