"""The heads stage: softmax and logistic heads on each backbone's cached features, chosen on val, tested once.

One unit per (backbone, head kind), named "<backbone>-<kind>", reading that backbone's features
unit. Its key holds the [heads] settings that kind uses (shared ones plus its own `<kind>_*`
fields) and the seed, so changing a logistic setting refits only the logistic heads and never
re-extracts features.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy

from . import cache, evaluate, extract, linear_heads, results
from .config import HEAD_KINDS, Config, ConfigError, HeadsConfig
from .features import AUGMENTED_GROUP, features_file
from .graph import BuildContext, BuildResult, Stage, Unit, register_stage
from .runtime import Timings, environment, seed_everything

CODE_VERSION = "3"  # 2: softmax decays trained side by side, logistic on one BLAS thread; 3: predictions.npz
SOFTMAX_FILE = "head.pt"
LOGISTIC_FILE = "head.joblib"
# Fields that configure the stage as a whole rather than one head (they never enter a unit's key).
STAGE_FIELDS = ("kinds",)


def head_settings(config: Config, kind: str) -> dict:
    """The [heads] fields that change a `kind` head: shared ones and `<kind>_*` ones, plus the seed."""
    prefixes = tuple(f"{other}_" for other in HEAD_KINDS)
    settings = {}
    for spec in dataclasses.fields(HeadsConfig):
        name = spec.name
        if name in STAGE_FIELDS or (name.startswith(prefixes) and not name.startswith(f"{kind}_")):
            continue
        settings[name] = getattr(config.heads, name)
    return {"kind": kind, **settings, "seed": config.runtime.seed}


def plan(config: Config, graph) -> list[Unit]:
    if not config.heads.normalizations:
        raise ConfigError(f"[heads] normalizations must list at least one of: {', '.join(linear_heads.NORMALIZATIONS)}")
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


def load_splits(path, use_augmented_views: bool) -> tuple[dict, dict]:
    """(attributes, {fit, val, test} -> (features, labels)); fit = train plus its augmented views when used."""
    attributes = extract.read_attributes(path)
    groups = {split: extract.read_group(path, split) for split in ("train", "val", "test")}
    fit = [groups["train"]]
    if use_augmented_views and AUGMENTED_GROUP in attributes["groups"]:
        fit.append(extract.read_group(path, AUGMENTED_GROUP))
    splits = {name: (group["features"], group["labels"]) for name, group in groups.items()}
    splits["fit"] = (
        numpy.concatenate([group["features"] for group in fit]),
        numpy.concatenate([group["labels"] for group in fit]),
    )
    return attributes, splits


def _softmax_options(settings: HeadsConfig, seed: int) -> dict:
    return {
        "lr": settings.softmax_lr,
        "batch_size": settings.softmax_batch_size,
        "label_smoothing": settings.softmax_label_smoothing,
        "seed": seed,
    }


def _softmax_payload(head, normalizer: linear_heads.Normalizer) -> dict:
    import torch

    # Tensors only, so the file loads with torch.load(weights_only=True).
    state = {
        name: None if value is None else torch.as_tensor(value) if not isinstance(value, str) else value
        for name, value in normalizer.state().items()
    }
    return {"state_dict": head.state_dict(), "normalizer": state}


def select(kind: str, settings: HeadsConfig, splits: dict, num_classes: int, seed: int) -> tuple:
    """Hyper-parameter search on val: (choice, every candidate, payload of the chosen head fitted on train)."""
    if kind == "softmax":
        chosen, candidates, head, normalizer = linear_heads.select_softmax(
            splits["fit"],
            splits["val"],
            num_classes,
            normalizations=settings.normalizations,
            weight_decays=settings.softmax_weight_decays,
            epochs=settings.softmax_epochs,
            **_softmax_options(settings, seed),
        )
        return chosen, candidates, _softmax_payload(head, normalizer)
    chosen, candidates, model, normalizer = linear_heads.select_logistic(
        splits["fit"],
        splits["val"],
        normalizations=settings.normalizations,
        cs=settings.logistic_cs,
        solver=settings.logistic_solver,
        max_iter=settings.logistic_max_iter,
        tolerance=settings.logistic_tolerance,
        seed=seed,
        blas_threads=settings.logistic_blas_threads,
    )
    converged = next(
        c["converged"] for c in candidates if c["normalization"] == chosen["normalization"] and c["c"] == chosen["c"]
    )
    return {**chosen, "converged": converged}, candidates, {"model": model, "normalizer": normalizer.state()}


def refit(
    kind: str,
    settings: HeadsConfig,
    chosen: dict,
    features: numpy.ndarray,
    labels: numpy.ndarray,
    num_classes: int,
    seed: int,
) -> tuple[dict, dict]:
    """The chosen head fitted afresh on (features, labels): (choice with the refit's own flags, payload)."""
    normalizer = linear_heads.Normalizer.fit(chosen["normalization"], features)
    if kind == "softmax":
        head, _ = linear_heads.train_softmax(
            normalizer.apply(features),
            labels,
            num_classes,
            weight_decay=chosen["weight_decay"],
            epochs=chosen["epochs"],
            **_softmax_options(settings, seed),
        )
        return chosen, _softmax_payload(head, normalizer)
    model = linear_heads.make_logistic(
        chosen["c"], settings.logistic_solver, settings.logistic_max_iter, settings.logistic_tolerance, seed
    )
    model, converged = linear_heads.fit_logistic(
        model, normalizer.apply(features), labels, settings.logistic_blas_threads
    )
    return {**chosen, "converged": converged}, {"model": model, "normalizer": normalizer.state()}


def require_finite(payload: dict, name: str) -> None:
    """Stop with one line when a fitted head holds NaN or infinity: its test number would be meaningless."""
    if "model" in payload:
        arrays = [payload["model"].coef_, payload["model"].intercept_]
    else:
        arrays = [value.numpy() for value in payload["state_dict"].values()]
    if not all(numpy.isfinite(array).all() for array in arrays):
        raise linear_heads.HeadError(
            f"the {name} head diverged (its weights are not finite); nothing was cached; "
            "lower [heads] softmax_lr or raise the logistic regularisation and rerun"
        )


def predictor(payload: dict) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """A head payload (as saved) as a function from cached features to predicted classes."""
    normalizer = linear_heads.Normalizer.from_state(payload["normalizer"])
    if "model" in payload:
        return lambda features: payload["model"].predict(normalizer.apply(features))
    import torch

    weight = payload["state_dict"]["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(payload["state_dict"])
    return lambda features: linear_heads.predict_softmax(head, normalizer.apply(features))


def selection_key(unit: Unit, features_build_id: str | None) -> str:
    """Key of a unit's selection memo: every head setting but fit_on, and the exact features build it read."""
    settings = {name: value for name, value in unit.settings.items() if name != "fit_on"}
    features = unit.input("features")
    return cache.compute_key(
        "heads-selection", CODE_VERSION, settings, {"features": f"{features.key}:{features_build_id}"}
    )


def cached_selection(context: BuildContext, kind: str, splits: dict, num_classes: int, timings: Timings) -> tuple:
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


def save_head(directory, kind: str, payload: dict) -> str:
    """Write the fitted head atomically: torch state dict (softmax) or joblib (logistic); returns the file name."""
    if kind == "softmax":
        import torch

        with cache.atomic_path(directory / SOFTMAX_FILE) as temporary:
            torch.save(payload, temporary)
        return SOFTMAX_FILE
    import joblib

    with cache.atomic_path(directory / LOGISTIC_FILE) as temporary:
        joblib.dump(payload, temporary)
    return LOGISTIC_FILE


def load_head(directory) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """The head saved in a heads unit's folder, as a function from cached features to predicted classes."""
    directory = Path(directory)
    if (directory / SOFTMAX_FILE).is_file():
        import torch

        return predictor(torch.load(cache.require_intact(directory / SOFTMAX_FILE), weights_only=True))
    if (directory / LOGISTIC_FILE).is_file():
        import joblib

        return predictor(joblib.load(cache.require_intact(directory / LOGISTIC_FILE)))
    raise FileNotFoundError(f"no {SOFTMAX_FILE} or {LOGISTIC_FILE} in {directory}; run `make heads` first")


def build(context: BuildContext) -> BuildResult:
    config, unit = context.config, context.unit
    kind = unit.settings["kind"]
    backbone = unit.input("features").name
    seed = config.runtime.seed
    seed_everything(seed)
    settings, fit_on = config.heads, config.heads.fit_on
    attributes, splits = load_splits(features_file(context.input_directory("features")), settings.use_augmented_views)
    class_names = attributes["class_names"]
    timings = Timings()
    chosen, candidates, payload, reused = cached_selection(context, kind, splits, len(class_names), timings)
    with timings.phase("fit"):
        if fit_on == "train+val":
            chosen, payload = refit(kind, settings, chosen, *_with_val(splits), len(class_names), seed)
    require_finite(payload, results.frozen_unit(backbone, kind))
    predict = predictor(payload)
    with timings.phase("evaluation"):
        predicted = predict(splits["test"][0])
        metrics = evaluate.classification_metrics(splits["test"][1], predicted, len(class_names))
    head_file = save_head(
        context.directory,
        kind,
        {**payload, "kind": kind, "backbone": backbone, "class_names": class_names, "selected": chosen},
    )
    extraction = attributes["timings"]
    extract_seconds = sum(record["seconds"] for record in extraction.values())
    extracted_images = sum(record["images"] for record in extraction.values())
    train_seconds = timings.seconds["selection"] + timings.seconds["fit"]
    fit_rows = len(splits["fit"][1]) + (len(splits["val"][1]) if fit_on == "train+val" else 0)
    record = {
        "arm": results.frozen_arm(backbone, kind),
        "method": results.FROZEN,
        "backbone": backbone,
        "head": kind,
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
    }
    test = extract.read_group(features_file(context.input_directory("features")), "test", ("image_ids",))
    evaluate.write_result(
        context.directory, record, labels=splits["test"][1], predictions=predicted, image_ids=test["image_ids"]
    )
    context.log(
        f"[heads] {record['arm']}: val {chosen['val_top1']:.3f}, test top-1 {metrics['top1']:.3f}, "
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
        description="Softmax and logistic heads on cached features.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
