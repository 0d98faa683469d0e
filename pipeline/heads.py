"""The heads stage: every registered head kind asked for on each backbone's cached features, chosen on val, tested once.

One unit per (backbone, head kind), named "<backbone>-<kind>", reading that backbone's features
unit. Its key holds the shared [heads] settings, that kind's own [heads.<kind>] table and the seed,
so changing a logistic setting refits only the logistic heads and never re-extracts features. What
a kind does (search, refit, file, prediction) comes from the head-kind registry (pipeline/head_kinds).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy

from . import cache, evaluate, features_h5, results
from .config import Config, ConfigError, HeadsConfig
from .features import AUGMENTED_GROUP, features_file
from .graph import BuildContext, BuildResult, Stage, Unit, register_stage
from .head_kinds import HeadError, HeadKind, Problem, get_head_kind, saved_kind
from .head_kinds.linear import NORMALIZATIONS
from .runtime import Timings, environment, seed_everything

CODE_VERSION = "3"  # 2: softmax decays trained side by side, logistic on one BLAS thread; 3: predictions.npz
# Fields that configure the stage as a whole, or that enter a key per kind (the tables), not as they are.
STAGE_FIELDS = ("kinds", "tables")


def head_settings(config: Config, kind: str) -> dict:
    """What changes a `kind` head: the shared [heads] fields, its own [heads.<kind>] table and the seed.

    The table's keys enter as `<kind>_<key>`, the names they had as flat [heads] keys, so a head
    cached before the tables existed keeps its key.
    """
    shared = {
        spec.name: getattr(config.heads, spec.name)
        for spec in dataclasses.fields(HeadsConfig)
        if spec.name not in STAGE_FIELDS
    }
    own = {f"{kind}_{name}": value for name, value in dataclasses.asdict(config.heads.table(kind)).items()}
    return {"kind": kind, **shared, **own, "seed": config.runtime.seed}


def plan(config: Config, graph) -> list[Unit]:
    if not config.heads.normalizations:
        raise ConfigError(f"[heads] normalizations must list at least one of: {', '.join(NORMALIZATIONS)}")
    units = []
    for backbone in config.features.backbones:
        # One extraction serves every seed: repeats vary the head's initialisation and data order.
        features_unit = graph.unit("features", backbone)
        for kind in config.heads.kinds:
            for seed in config.run_seeds():
                units.append(
                    Unit(
                        stage="heads",
                        name=config.seeded_name(results.frozen_unit(backbone, kind), seed),
                        code_version=CODE_VERSION,
                        settings=head_settings(config.with_seed(seed), kind),
                        inputs=(("features", features_unit),),
                        seed=seed,
                    )
                )
    return units


def _rows(group: dict, rows) -> dict:
    return {name: values[rows] for name, values in group.items()}


def load_splits(path, use_augmented_views: bool, choose_train: Callable | None = None) -> tuple[dict, dict]:
    """(attributes, {train, fit, val, test} -> (features, labels)); fit = train plus its augmented views when used.

    `choose_train` (train labels -> sorted row indices) keeps only those training images, and of the
    augmented views only those of the kept images (matched by image id), as the label-efficiency curves ask.
    """
    attributes = features_h5.read_attributes(path)
    groups = {split: features_h5.read_group(path, split) for split in ("train", "val", "test")}
    if choose_train is not None:
        groups["train"] = _rows(groups["train"], choose_train(groups["train"]["labels"]))
    fit = [groups["train"]]
    if use_augmented_views and AUGMENTED_GROUP in attributes["groups"]:
        augmented = features_h5.read_group(path, AUGMENTED_GROUP)
        if choose_train is not None:
            augmented = _rows(augmented, numpy.isin(augmented["image_ids"], groups["train"]["image_ids"]))
        fit.append(augmented)
    splits = {name: (group["features"], group["labels"]) for name, group in groups.items()}
    splits["fit"] = (
        numpy.concatenate([group["features"] for group in fit]),
        numpy.concatenate([group["labels"] for group in fit]),
    )
    return attributes, splits


def select(kind: HeadKind, settings: HeadsConfig, splits: dict, num_classes: int, seed: int) -> tuple:
    """Hyper-parameter search on val: (choice, every candidate, payload of the chosen head fitted on the fit rows)."""
    problem = Problem(splits["fit"], splits["val"], num_classes, list(settings.normalizations), seed)
    return kind.select(settings.table(kind.name), problem)


def refit(
    kind: HeadKind, settings: HeadsConfig, chosen: dict, features, labels, num_classes: int, seed: int
) -> tuple[dict, dict]:
    """The chosen head fitted afresh on (features, labels): (choice with the refit's own flags, payload)."""
    return kind.refit(settings.table(kind.name), chosen, features, labels, num_classes, seed)


def require_finite(kind: HeadKind, payload: dict, name: str) -> None:
    """Stop with one line when a fitted head holds NaN or infinity: its test number would be meaningless."""
    if not kind.finite(payload):
        raise HeadError(
            f"the {name} head diverged (its fitted values are not finite); nothing was cached; {kind.remedy} and rerun"
        )


def selection_key(unit: Unit, features_build_id: str | None) -> str:
    """Key of a unit's selection memo: every head setting but fit_on, and the exact features build it read."""
    settings = {name: value for name, value in unit.settings.items() if name != "fit_on"}
    features = unit.input("features")
    return cache.compute_key(
        "heads-selection", CODE_VERSION, settings, {"features": f"{features.key}:{features_build_id}"}
    )


def cached_selection(context: BuildContext, kind: HeadKind, splits: dict, num_classes: int, timings: Timings) -> tuple:
    """select(), reused from the unit's memo when only fit_on changed since it ran; returns (.., reused)."""
    import joblib

    features_manifest = cache.read_manifest(context.input_directory("features")) or {}
    path = cache.memo_path(context.directory, selection_key(context.unit, features_manifest.get("build_id")), ".joblib")
    try:
        memo = joblib.load(io.BytesIO(cache.read_sealed(path)))
        timings.seconds["selection"] = memo["seconds"]
        return memo["chosen"], memo["candidates"], memo["payload"], True
    except FileNotFoundError:
        pass
    except Exception as error:  # a damaged memo only costs the search again
        context.log(f"[heads] {context.unit.name}: ignoring unreadable selection memo ({error})")
    with timings.phase("selection"):
        chosen, candidates, payload = select(
            kind, context.config.heads, splits, num_classes, context.config.runtime.seed
        )
    buffer = io.BytesIO()
    joblib.dump(
        {"chosen": chosen, "candidates": candidates, "payload": payload, "seconds": timings.seconds["selection"]},
        buffer,
    )
    cache.write_sealed(path, buffer.getbuffer())
    cache.prune_memos(context.directory)
    return chosen, candidates, payload, False


def _with_val(splits: dict) -> tuple:
    return (
        numpy.concatenate([splits["fit"][0], splits["val"][0]]),
        numpy.concatenate([splits["fit"][1], splits["val"][1]]),
    )


def save_head(directory, kind: HeadKind, payload: dict) -> str:
    """Write the fitted head atomically, in its kind's own format; returns the file name."""
    with cache.atomic_path(Path(directory) / kind.file_name) as temporary:
        kind.save(temporary, payload)
    return kind.file_name


def saved_head(directory) -> tuple[HeadKind, dict]:
    """(kind, payload as saved) of the head in a heads unit's folder, its file checked intact first."""
    kind = saved_kind(directory)
    return kind, kind.load(cache.require_intact(Path(directory) / kind.file_name))


def load_head(directory) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """The head saved in a heads unit's folder, as a function from cached features to predicted classes."""
    kind, payload = saved_head(directory)
    return kind.predictor(payload)


def build(context: BuildContext, choose_train: Callable | None = None, extra: dict | None = None) -> BuildResult:
    """Select on val, fit, test once and write one frozen arm's unit; the curves stage passes `choose_train`
    (its subset of the training images, see load_splits) and the `extra` fields its result.json adds."""
    config, unit = context.config, context.unit
    kind = get_head_kind(unit.settings["kind"])
    backbone = unit.input("features").name
    seed = config.runtime.seed
    seed_everything(seed)
    settings, fit_on = config.heads, config.heads.fit_on
    attributes, splits = load_splits(
        features_file(context.input_directory("features")), settings.use_augmented_views, choose_train
    )
    class_names = attributes["class_names"]
    timings = Timings()
    chosen, candidates, payload, reused = cached_selection(context, kind, splits, len(class_names), timings)
    with timings.phase("fit"):
        if fit_on == "train+val":
            chosen, payload = refit(kind, settings, chosen, *_with_val(splits), len(class_names), seed)
    require_finite(kind, payload, results.frozen_unit(backbone, kind.name))
    predict = kind.predictor(payload)
    with timings.phase("evaluation"):
        predicted = predict(splits["test"][0])
        metrics = evaluate.classification_metrics(splits["test"][1], predicted, len(class_names))
    head_file = save_head(
        context.directory,
        kind,
        {**payload, "kind": kind.name, "backbone": backbone, "class_names": class_names, "selected": chosen},
    )
    extraction = attributes["timings"]
    extract_seconds = sum(record["seconds"] for record in extraction.values())
    extracted_images = sum(record["images"] for record in extraction.values())
    train_seconds = timings.seconds["selection"] + timings.seconds["fit"]
    fit_rows = len(splits["fit"][1]) + (len(splits["val"][1]) if fit_on == "train+val" else 0)
    record = {
        "arm": results.frozen_arm(backbone, kind.name),
        "method": results.FROZEN,
        "backbone": backbone,
        "head": kind.name,
        "input_size": attributes["input_size"],
        "train_images": len(splits["train"][1]) + (len(splits["val"][1]) if fit_on == "train+val" else 0),
        "fit_rows": fit_rows,
        "fit_on": fit_on,
        "seed": seed,
        "device": attributes["device"],
        "precision": attributes["precision"],
        "augmented_views": attributes["augmented_views"],
        "test_top1": metrics["top1"],
        "test_mean_per_class": metrics["mean_per_class"],
        # From the selection fit on train: with fit_on = train+val the final head has seen val.
        "val_top1": chosen["val_top1"],
        "val_top1_from": "selection fit on train",
        # With a reused selection, selection seconds are what the search cost when it ran.
        "train_seconds": train_seconds,
        "selection_reused": reused,
        "extract_seconds": extract_seconds,
        "eval_seconds": timings.seconds["evaluation"],
        "total_seconds": extract_seconds + train_seconds + timings.seconds["evaluation"],
        "images_per_second": extracted_images / extract_seconds if extract_seconds > 0 else None,
        "per_class_accuracy": metrics["per_class_accuracy"],
        "confusion_matrix": metrics["confusion_matrix"],
        "class_names": class_names,
        "selected": chosen,
        "candidates": candidates,
        "timings": {
            "extract": {group: record["seconds"] for group, record in extraction.items()},
            "head_selection": timings.seconds["selection"],
            "head_fit": timings.seconds["fit"],
            "evaluation": timings.seconds["evaluation"],
        },
        "features": {
            "unit_key": unit.input("features").key,
            "weights_id": attributes["weights_id"],
            "weights_sha256": attributes["weights_sha256"],
        },
        "weights_verified": attributes.get("weights_verified", "unknown"),
        **(extra or {}),
    }
    test = features_h5.read_group(features_file(context.input_directory("features")), "test", ("image_ids",))
    evaluate.write_result(
        context.directory, record, labels=splits["test"][1], predictions=predicted, image_ids=test["image_ids"]
    )
    label = record["arm"] if unit.stage == "heads" else unit.name
    context.log(
        f"[{unit.stage}] {label}: val {chosen['val_top1']:.3f}, test top-1 {metrics['top1']:.3f}, "
        f"mean per-class {metrics['mean_per_class']:.3f} (fit on {fit_on}; selection "
        f"{timings.seconds['selection']:.1f} s{' (reused)' if reused else ''}, "
        f"fit {timings.seconds['fit']:.1f} s)"
    )
    return BuildResult(
        files=[results.RESULT, evaluate.PREDICTIONS, head_file],
        metrics={
            "test_top1": metrics["top1"],
            "test_mean_per_class": metrics["mean_per_class"],
            "val_top1": chosen["val_top1"],
        },
        timings={
            "selection_seconds": timings.seconds["selection"],
            "fit_seconds": timings.seconds["fit"],
            "evaluation_seconds": timings.seconds["evaluation"],
        },
        extra={"selected": chosen, "selection_reused": reused},
        environment=environment(),
    )


STAGE = register_stage(
    Stage(
        name="heads",
        description="Heads of every kind in [heads] kinds on cached features.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
