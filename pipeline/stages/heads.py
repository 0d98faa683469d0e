"""The heads stage: every registered head kind asked for on each backbone's cached features, chosen on val, tested once.

One unit per (backbone, head kind), named "<backbone>-<kind>", reading that backbone's features
unit. Its key holds the shared [heads] settings, that kind's own [heads.<kind>] table and the seed,
so changing a logistic setting refits only the logistic heads and never re-extracts features. What
a kind does (search, refit, file, prediction) comes from the head-kind registry (pipeline/head_kinds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy

from .. import cache, evaluate, features_h5, integrity, results
from ..config import Config, ConfigError, HeadsConfig
from ..features_h5 import features_file
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage
from ..head_kinds import HeadKind, get_head_kind
from ..head_kinds.fitting import load_splits, refit, require_finite, save_head, select
from ..head_kinds.linear import NORMALIZATIONS
from ..runtime import Timings, environment, seed_everything
from ..settings import without_neutral_defaults

CODE_VERSION = "3"  # 2: softmax decays trained side by side, logistic on one BLAS thread; 3: predictions.npz
# Fields that configure the stage as a whole, or that enter a key per kind (the tables), not as they are.
STAGE_FIELDS = ("kinds", "tables")


# Head settings whose default leaves every bit as before they existed (settings.without_neutral_defaults).
KEY_NEUTRAL_DEFAULTS = {"softmax_patience": 0}


def head_settings(config: Config, kind: str) -> dict:
    """What changes a `kind` head: the shared [heads] fields, its own [heads.<kind>] table and the seed.

    The table's keys enter as `<kind>_<key>`, the names they had as flat [heads] keys, so a head
    cached before the tables existed keeps its key; KEY_NEUTRAL_DEFAULTS at their default stay out.
    """
    shared = {
        spec.name: getattr(config.heads, spec.name)
        for spec in dataclasses.fields(HeadsConfig)
        if spec.name not in STAGE_FIELDS
    }
    table = {f"{kind}_{name}": value for name, value in dataclasses.asdict(config.heads.table(kind)).items()}
    own = without_neutral_defaults(table, KEY_NEUTRAL_DEFAULTS)
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


def selection_key(config: Config, kind: HeadKind, features_id: str, train_rows: numpy.ndarray) -> str:
    """Key of a selection memo: everything the search on val depends on, and nothing else.

    That is the kind's settings but fit_on (the search always fits train), the seed unless the kind
    is deterministic, the exact features build read, and which training rows were fitted (indices
    into the train split; their augmented views follow from them). Units that fit the same rows with
    the same settings (a deterministic kind's seeds, a curve point that takes the whole train split
    and its heads arm) get the same key, so one search serves them all.
    """
    settings = {
        name: value
        for name, value in head_settings(config, kind.name).items()
        if name != "fit_on" and not (name == "seed" and kind.deterministic)
    }
    rows = hashlib.sha256(numpy.ascontiguousarray(train_rows, dtype=numpy.int64).tobytes()).hexdigest()
    return cache.compute_key("heads-selection", CODE_VERSION, settings, {"features": features_id, "train_rows": rows})


@dataclasses.dataclass
class Selection:
    """What a head's search on val gave, from a memo or searched now."""

    chosen: dict
    candidates: list
    payload: dict  # the chosen head fitted on the fit rows
    seconds: float  # what the search cost when it ran
    key: str  # its memo's key (selection_key)
    source: str | None  # None: searched now; "": the unit's own memo; else "<stage>/<unit>" whose memo it was
    # The test split's predicted classes by `payload` and the seconds they took, once a unit has evaluated it:
    # the same key means the same head and the same test features, so they are the same predictions.
    test: dict | None = None


def write_memo(context: BuildContext, selection: Selection) -> None:
    """Seal `selection` into the unit's own memo folder under its key, keeping only the newest memos."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(
        {
            "chosen": selection.chosen,
            "candidates": selection.candidates,
            "payload": selection.payload,
            "seconds": selection.seconds,
            "test": selection.test,
        },
        buffer,
    )
    integrity.write_sealed(cache.memo_path(context.directory, selection.key, ".joblib"), buffer.getbuffer())
    cache.prune_memos(context.directory)


def cached_selection(
    context: BuildContext, kind: HeadKind, problem: tuple, timings: Timings, shared: Iterable[Path] = ()
) -> Selection:
    """select() on `problem` (splits, classes, train rows), reused from a memo of the same key when one
    exists: the unit's own (only fit_on changed since it ran), else one in a `shared` unit folder."""
    import joblib

    splits, num_classes, train_rows = problem
    features_manifest = cache.read_manifest(context.input_directory("features")) or {}
    features_id = f"{context.unit.input('features').key}:{features_manifest.get('build_id')}"
    key = selection_key(context.config, kind, features_id, train_rows)
    for directory in (context.directory, *shared):
        path = cache.memo_path(directory, key, ".joblib")
        try:
            memo = joblib.load(io.BytesIO(integrity.read_sealed(path)))
            timings.seconds["selection"] = memo["seconds"]
            source = "" if directory == context.directory else f"{directory.parent.name}/{directory.name}"
            return Selection(
                memo["chosen"], memo["candidates"], memo["payload"], memo["seconds"], key, source, memo.get("test")
            )
        except FileNotFoundError:
            pass
        except Exception as error:  # a damaged memo only costs the search again
            context.log(f"[{context.unit.stage}] {context.unit.name}: ignoring unreadable selection memo ({error})")
    with timings.phase("selection"):
        chosen, candidates, payload = select(
            kind, context.config.heads, splits, num_classes, context.config.runtime.seed
        )
    selection = Selection(chosen, candidates, payload, timings.seconds["selection"], key, None)
    write_memo(context, selection)
    return selection


def _evaluate_test(context: BuildContext, kind: HeadKind, selection: Selection, payload: dict, splits: dict, timings):
    """(the test split's predicted classes by `payload`, whether they came from the memo). From the memo
    when `payload` is the memo's own head and the memo holds them; their evaluation seconds are then what
    the evaluation cost when it ran. Evaluated here, they join the memo when it is the unit's own."""
    memo_head = payload is selection.payload
    remembered = selection.test if memo_head else None
    if remembered is not None and len(remembered["predicted"]) == len(splits["test"][1]):
        timings.seconds["evaluation"] = remembered["seconds"]
        return numpy.asarray(remembered["predicted"]), True
    predict = kind.predictor(payload)
    with timings.phase("evaluation"):
        predicted = predict(splits["test"][0])
    if memo_head and selection.source in (None, ""):  # another unit's memo is left as it is
        selection.test = {"predicted": predicted, "seconds": timings.seconds["evaluation"]}
        write_memo(context, selection)
    return predicted, False


def _reuse_note(source: str | None) -> str:
    return "" if source is None else f" (reused from {source})" if source else " (reused)"


def _with_val(splits: dict) -> tuple:
    return (
        numpy.concatenate([splits["fit"][0], splits["val"][0]]),
        numpy.concatenate([splits["fit"][1], splits["val"][1]]),
    )


def build(
    context: BuildContext,
    choose_train: Callable | None = None,
    extra: dict | None = None,
    shared_memos: Iterable[Path] = (),
) -> BuildResult:
    """Select on val, fit, test once and write one frozen arm's unit; the curves stage passes `choose_train`
    (its subset of the training images, see fitting.load_splits), the `extra` fields its result.json adds
    and `shared_memos`, the folders of units whose selection memo the point may reuse (the key decides)."""
    config, unit = context.config, context.unit
    kind = get_head_kind(unit.settings["kind"])
    backbone = unit.input("features").name
    seed = config.runtime.seed
    seed_everything(seed)
    settings, fit_on = config.heads, config.heads.fit_on
    chosen_rows = []  # the training rows fitted, which the selection memo's key names

    def choose(labels):
        chosen_rows.append(choose_train(labels))
        return chosen_rows[0]

    attributes, splits = load_splits(
        features_file(context.input_directory("features")),
        settings.use_augmented_views,
        None if choose_train is None else choose,
    )
    train_rows = chosen_rows[0] if chosen_rows else numpy.arange(len(splits["train"][1]))
    class_names = attributes["class_names"]
    timings = Timings()
    selection = cached_selection(context, kind, (splits, len(class_names), train_rows), timings, shared_memos)
    chosen, candidates, payload, source = selection.chosen, selection.candidates, selection.payload, selection.source
    reused = source is not None
    with timings.phase("fit"):
        if fit_on == "train+val":
            chosen, payload = refit(kind, settings, chosen, *_with_val(splits), len(class_names), seed)
    require_finite(kind, payload, results.frozen_unit(backbone, kind.name))
    predicted, evaluation_reused = _evaluate_test(context, kind, selection, payload, splits, timings)
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
        # The test predictions came from the memo (the same head on the same test features); their
        # eval seconds are then what the evaluation cost when it ran.
        "evaluation_reused": evaluation_reused,
        # Only when the memo is another unit's (a curve point equal to it): which one searched.
        **({"selection_from": source} if source else {}),
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
        f"{timings.seconds['selection']:.1f} s{_reuse_note(source)}, "
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
