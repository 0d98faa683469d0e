"""Top-k class predictions for new images from one trained arm (`make predict IMG=... [ARM=...]`).

Not a cached stage: it reads the arms the graph built under the current config and never builds
anything. Every arm predicts through the same code its stage tested with, so a test image gets the
class the arm's own test evaluation gave it:
- frozen arms: the features unit's backbone and recorded preprocessing/input size, the extraction
  path of pipeline/extract.py (the eval pixels of pipeline/pixels.py, batched normalisation,
  autocast), then the saved head;
- end-to-end arms (finetune, scratch): model.pt rebuilt the way the stage built it, the image read
  into the same eval pixels as the stage stores its splits (pipeline/images.py) and evaluated with
  train.predict.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from . import backbones, cache, checkpoints, errors, extract, features_h5, frozen, images, models, pixels, train
from .arms import arm_states
from .config import Config
from .errors import PipelineError
from .graph import Graph, read_json
from .head_kinds import fitting
from .pixels import decode_problem, open_rgb
from .results import RESULT, best_arm, make_record
from .runtime import Runtime, resolve_runtime, seed_everything

DEFAULT_TOP = 5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PredictError(PipelineError, ValueError):
    """A bad image path, an unknown or untrained arm, or an arm whose saved files do not fit together."""


@dataclass(frozen=True)
class Arm:
    """A trained arm: where its unit lives and its result.json."""

    name: str
    method: str
    stage: str
    unit: str
    directory: Path
    result: dict

    @property
    def class_names(self) -> list:
        return list(self.result["class_names"])


# --- inputs ------------------------------------------------------------------------------------------


def image_files(inputs: list) -> list[Path]:
    """Every image named by `inputs` (files, or folders whose image files are taken in name order), checked readable."""
    from PIL import UnidentifiedImageError

    if not inputs:
        raise PredictError("no image given; pass one or more image files or a folder (make predict IMG=<path>)")
    paths = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(item for item in path.iterdir() if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PredictError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise PredictError(f"no such image file or folder: {path}")
    for path in paths:
        # Checked up front so a bad file fails in one line before any model is loaded; a JPEG that
        # decodes only with warnings (corrupt data) is refused too, as the data check refuses it.
        problem = decode_problem(path)
        if problem is None:
            try:
                open_rgb(path)
            except (UnidentifiedImageError, OSError, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            raise PredictError(f"{path} is not a readable image ({problem}); replace it or leave it out")
    return paths


# --- arms --------------------------------------------------------------------------------------------


def trained_arms(config: Config, graph: Graph) -> tuple[list[dict], dict[str, Arm]]:
    """(state of every arm the config expects, {name: Arm} of those whose unit is valid and has result.json)."""
    # With repeats over seeds, predictions come from each arm's first-seed run.
    states = [state for state in arm_states(config, graph) if state["seed"] == config.runtime.seed]
    trained = {}
    for state in states:
        if state["missing"] is not None:
            continue
        directory = cache.unit_dir(graph.cache_root, state["stage"], state["unit"])
        try:
            result = read_json(cache.require_intact(directory / RESULT))
        except (OSError, ValueError, errors.CacheError) as error:
            state["missing"] = f"cannot read {directory / RESULT}: {error}"
            continue
        trained[state["arm"]] = Arm(state["arm"], state["method"], state["stage"], state["unit"], directory, result)
    return states, trained


def choose_arm(config: Config, graph: Graph, name: str | None = None) -> Arm:
    """The arm called `name`, or (None) the best trained arm by val top-1 - the report's own choice.

    The best arm is chosen with results.best_arm over the arms valid now, which is what the report
    shows whenever it is up to date, and still works when no report was built.
    """
    states, trained = trained_arms(config, graph)
    trained_list = ", ".join(trained) or "none yet"
    if name is None:
        records = [
            make_record(state, trained[state["arm"]].result, graph.cache_root)
            for state in states
            if state["arm"] in trained
        ]
        best = best_arm(records)
        if best is None:
            # An arm built under other settings is the likely surprise; name one so the user sees why.
            stale = next(
                (state for state in states if state["missing"] and not state["missing"].startswith("no manifest")), None
            )
            hint = f" ({stale['arm']}: {stale['missing']})" if stale else ""
            raise PredictError(f"no arm is trained yet under this config{hint}; run `make all` (or `make heads`) first")
        return trained[best["arm"]]
    if name in trained:
        return trained[name]
    state = next((state for state in states if state["arm"] == name), None)
    if state is None:
        raise PredictError(
            f"unknown arm {name!r}; this config's arms: {', '.join(s['arm'] for s in states)} (trained: {trained_list})"
        )
    raise PredictError(f"arm {name} is not trained yet ({state['missing']}); trained arms: {trained_list}")


# --- predictors: list of image paths -> probabilities [N, classes] -----------------------------------


def head_probabilities(directory: Path) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """Class probabilities from a heads unit's saved head, whatever its kind (load_head gives only the argmax)."""
    try:
        kind, payload = fitting.saved_head(directory)
    except FileNotFoundError as error:
        raise PredictError(str(error)) from None
    return kind.probabilities(payload)


def frozen_features(config: Config, graph: Graph, arm: Arm, runtime: Runtime) -> Callable[[list], numpy.ndarray]:
    """Image paths -> pooled features, exactly as the arm's features unit extracted its splits."""
    features_unit = graph.unit("heads", arm.unit).input("features")
    path = cache.require_intact(features_h5.features_file(graph.directory(features_unit)))
    attributes = features_h5.read_attributes(path)
    recipe = attributes["preprocessing"]
    preprocessing = backbones.Preprocessing(
        recipe["input_size"],
        recipe["resize_size"],
        recipe["interpolation"],
        tuple(recipe["mean"]),
        tuple(recipe["std"]),
    )
    name = attributes["backbone"]
    source = frozen.resolve_source(config, name)
    if source["weights_sha256"] != attributes["weights_sha256"]:
        raise PredictError(
            f"the {name} weights found now ({source['weights_id']}) are not the ones its features "
            f"were extracted with ({attributes['weights_id']}); rerun `make heads`"
        )
    # The precision the features were extracted in (with "auto", this machine's calibrated choice or another's).
    runtime = dataclasses.replace(
        runtime,
        precision=attributes.get("precision", runtime.precision),
        engine=attributes.get("engine", "torch"),  # files from before the setting were all torch's
    )
    # Test-only backbones are random-init: the extraction seeded torch right before building them.
    seed_everything(attributes["seed"])
    # The rewrite the features were extracted with (files from before the setting had none).
    model = frozen.load_frozen_backbone(
        name,
        source["weights_path"],
        runtime.device,
        runtime.channels_last,
        bool(attributes.get("fold_batchnorm", False)),
        runtime.engine,
        attributes["input_size"],
    )

    return lambda paths: frozen_features_of(
        model, paths, preprocessing, attributes["input_size"], runtime, config.features.batch_size
    )


def frozen_features_of(
    model: torch.nn.Module, paths: list, preprocessing, input_size: int, runtime: Runtime, batch_size: int
) -> numpy.ndarray:
    """Pooled features of image files through a frozen `model`: extraction's eval pixels, dataset and batches."""
    evaluation, mean, std = pixels.eval_pipeline(preprocessing, input_size)
    count = len(paths)
    job = extract.Job(
        group="predict",
        paths=list(paths),
        labels=numpy.zeros(count, dtype=numpy.int64),
        image_ids=numpy.zeros(count, dtype=numpy.int64),
        views=numpy.zeros(count, dtype=numpy.int64),
        transform=evaluation,
    )
    loader = torch.utils.data.DataLoader(extract.ImageDataset(job), batch_size=batch_size, shuffle=False, num_workers=0)
    return numpy.concatenate(list(extract.extract_batches(model, loader, runtime, mean, std)))


def end_to_end_logits_of(
    model: torch.nn.Module, paths: list, preprocessing, input_size: int, runtime: Runtime, batch_size: int
) -> torch.Tensor:
    """Logits of image files through an end-to-end arm's `model`: the eval pixels its stage cached its test split as."""
    return train.predict(
        model, images.eval_set(paths, preprocessing, input_size).to(runtime.device), runtime, batch_size
    )


def end_to_end_model(config: Config, arm: Arm, runtime: Runtime) -> tuple[torch.nn.Module, backbones.Preprocessing]:
    """The arm's best-on-val network from model.pt, built as its stage built it, in eval mode on the device."""
    result = arm.result
    num_classes = len(arm.class_names)
    if arm.method == "finetune":
        model, spec = models.build_finetune_model(
            result["backbone"], num_classes, pretrained=False, allow_download=False
        )
        preprocessing = spec.preprocessing
    else:
        model = models.build_scratch_model(config.cnn, num_classes, result["input_size"])
        preprocessing = models.SCRATCH_PREPROCESSING
    model.load_state_dict(
        torch.load(cache.require_intact(arm.directory / checkpoints.MODEL), map_location="cpu", weights_only=True)
    )
    return runtime.place(model).eval(), preprocessing


def predictor(config: Config, graph: Graph, arm: Arm) -> Callable[[list], numpy.ndarray]:
    """Image paths -> class probabilities [N, classes] from `arm`, through its stage's own test-time path."""
    runtime = resolve_runtime(config.runtime)
    if arm.method == "frozen":
        extract_features = frozen_features(config, graph, arm, runtime)
        probabilities = head_probabilities(arm.directory)
        return lambda paths: probabilities(extract_features(paths))
    model, preprocessing = end_to_end_model(config, arm, runtime)
    settings = config.finetune if arm.method == "finetune" else config.cnn

    def run(paths: list) -> numpy.ndarray:
        logits = end_to_end_logits_of(
            model, paths, preprocessing, arm.result["input_size"], runtime, 2 * settings.batch_size
        )
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return run


# --- the command -------------------------------------------------------------------------------------


def predict(
    config: Config, inputs: list, arm_name: str | None = None, top: int = DEFAULT_TOP, graph: Graph | None = None
) -> dict:
    """Top-`top` classes per image from one arm (default: best on val), as JSON-ready data.

    {"arm", "method", "val_top1", "test_top1", "predictions": [{"path", "top": [{"class", "label", "probability"}]}]}
    """
    if top < 1:
        raise PredictError(f"--top must be at least 1, got {top}")
    paths = image_files(inputs)
    graph = graph or Graph(config)
    arm = choose_arm(config, graph, arm_name)
    probabilities = predictor(config, graph, arm)(paths)
    names = arm.class_names
    predictions = []
    for path, row in zip(paths, probabilities, strict=True):
        # Stable sort so equal probabilities keep label order, as argmax would pick.
        order = numpy.argsort(-row, kind="stable")[: min(top, len(names))]
        predictions.append(
            {
                "path": str(path),
                "top": [
                    {"class": names[label], "label": int(label), "probability": float(row[label])} for label in order
                ],
            }
        )
    return {
        "arm": arm.name,
        "method": arm.method,
        "val_top1": arm.result.get("val_top1"),
        "test_top1": arm.result.get("test_top1"),
        "predictions": predictions,
    }


def format_text(output: dict) -> str:
    """Per image: its path, then one `  0.873  passion flower` line per class."""
    lines = []
    for prediction in output["predictions"]:
        lines.append(prediction["path"])
        lines += [f"  {entry['probability']:.3f}  {entry['class']}" for entry in prediction["top"]]
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    """Entry point of `python -m stages.predict` / `make predict IMG=... [ARM=...]`."""
    from . import cli

    def action():
        arguments = cli.parser("Top-k classes of images from one trained arm (default: the best on val).")
        arguments.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
        arguments.add_argument(
            "--arm", default=None, help="arm name, e.g. frozen-efficientnet-lite0-logistic (default: best val top-1)"
        )
        arguments.add_argument("--top", type=int, default=DEFAULT_TOP, help="classes shown per image (default: 5)")
        arguments.add_argument("--json", action="store_true", help="print machine-readable JSON instead")
        parsed = arguments.parse_args(argv)
        output = predict(cli.load(parsed), parsed.images, parsed.arm, parsed.top)
        if parsed.json:
            print(json.dumps(output, indent=2))
            return
        scores = ", ".join(
            f"{split} top-1 {output[f'{split}_top1']:.3f}"
            for split in ("val", "test")
            if output[f"{split}_top1"] is not None
        )
        print(f"arm {output['arm']} ({scores})", file=sys.stderr)
        print(format_text(output))

    return cli.guarded(action)
