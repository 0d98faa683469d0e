"""The finetune stage: every pretrained backbone in [finetune] backbones trained end to end.

One unit per backbone, keyed by the [finetune] settings (minus the backbone list), the sha256 of the
weights file, the number of classes, the seed, the precision and the device type. Recipe: build the
backbone with its weights, replace the head (`_fc` on EfficientNet), optionally fit that head first
as a linear probe on frozen features (LP-FT: the L2 strength chosen on val), then train everything
with the body at a lower LR, BatchNorm statistics optionally frozen, and keep the best epoch on val.
Test is touched once, by the best-on-val weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .. import cache, checkpoints, cpu_rewrites, data, distributed, images, results, train
from ..backbones import (
    WeightsUnavailableError,
    get_backbone,
    get_head,
    resolve_weights,
    set_head,
    weights_fingerprint,
    weights_verified,
)
from ..calibration import finetune_workload
from ..config import Config, ConfigError
from ..evaluate import finish_arm
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage
from ..head_kinds.linear import select_lbfgs_probe
from ..models import build_finetune_model, finetune_groups
from ..runtime import Timings, plan_runtime, resolve_runtime, seed_everything
from ..training_settings import keyed_section
from ..transforms import crop_sizes

# 2: predictions.npz; eval pixels are extraction's (pipeline/pixels.py), random crops rounded to uint8
CODE_VERSION = "2"
NOT_DOWNLOADED = "not-downloaded-yet"  # the build downloads, and the final key then has the real sha256


def _weights_identity(config: Config, name: str, allow_download: bool) -> tuple[str | None, str]:
    """(local weights path or None, what goes into the key: sha256, 'random-init' or NOT_DOWNLOADED)."""
    spec = get_backbone(name)
    if spec.weights is None:
        return None, "random-init"
    try:
        path = resolve_weights(spec, config.weights.get(name), allow_download=allow_download)
    except WeightsUnavailableError:
        if allow_download or config.weights.get(name) is not None:
            raise
        return None, NOT_DOWNLOADED
    return str(path), weights_fingerprint(path)


def _settings(config: Config, name: str, weights: str, runtime) -> dict:
    section = config.section("finetune")
    section.pop("backbones")  # adding a backbone to the list must not retrain the others
    return {
        "backbone": name,
        "finetune": keyed_section(section),
        "weights_sha256": weights,
        "num_classes": config.data.num_classes,
        "seed": config.runtime.seed,
        "precision": runtime.precision,
        "device": runtime.device_type,
        # fp32 depthwise training changes the numbers (bf16 rounding of their gradients is gone)
        "float32_depthwise": runtime.float32_depthwise,
    }


def plan(config: Config, graph) -> list[Unit]:
    distributed.check_batch_size("finetune", config.finetune.batch_size)
    settings = config.finetune
    if settings.linear_probe and (not settings.probe_weight_decays or min(settings.probe_weight_decays) < 0):
        raise ConfigError("[finetune] probe_weight_decays must list at least one value >= 0 when linear_probe = true")
    download = graph.units("download")[0]
    return [
        Unit(
            stage="finetune",
            name=config.seeded_name(results.finetune_unit(name), seed),
            code_version=CODE_VERSION,
            settings=_settings(
                config.with_seed(seed),
                name,
                _weights_identity(config, name, False)[1],
                plan_runtime(config.runtime, finetune_workload(config, name, graph.cache_root)),
            ),
            inputs=(("download", download),),
            seed=seed,
        )
        for name in settings.backbones
        for seed in config.run_seeds()
    ]


def linear_probe(model: nn.Module, spec, sets: dict, settings, runtime, log) -> dict:
    """Fit the new head on frozen features (eval mode, no augmentation), choosing its L2 strength on val."""
    started = time.perf_counter()
    head = get_head(model, spec)
    set_head(model, spec, nn.Identity())
    runtime.place(model)
    features = {
        split: train.predict(model, sets[split].to(runtime.device), runtime, 2 * settings.batch_size).cpu()
        for split in ("train", "val")
    }
    set_head(model, spec, head)

    def report(weight_decay: float, val_top1: float) -> None:
        log(f"[finetune] {spec.name}: linear probe weight decay {weight_decay:g}: val top-1 {val_top1:.4f}")

    chosen, weight, bias = select_lbfgs_probe(
        (features["train"], sets["train"].labels),
        (features["val"], sets["val"].labels),
        head.out_features,
        weight_decays=settings.probe_weight_decays,
        label_smoothing=settings.label_smoothing,
        report=report,
    )
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device))
        head.bias.copy_(bias.to(head.bias.device))
    return {**chosen, "seconds": time.perf_counter() - started}


def build(context: BuildContext, choose_train: Callable | None = None, extra: dict | None = None) -> BuildResult:
    """Fine-tune one backbone; the curves stage passes `choose_train` (its subset of the training images)
    and the `extra` fields its result.json adds."""
    config = context.config
    settings = config.finetune
    name = context.unit.settings["backbone"]
    runtime = resolve_runtime(config.runtime, finetune_workload(config, name, context.cache_root))
    seed_everything(runtime.seed)
    timings = Timings(runtime)
    spec = get_backbone(name)
    with timings.phase("weights"):
        weights_path, weights_sha256 = _weights_identity(config, name, allow_download=True)
        # The data's class count: [data] num_classes may be 0 ("from the data") for other dataset kinds.
        num_classes = len(data.load_index(context.input_directory("download")).class_names)
        model, spec = build_finetune_model(
            name, num_classes, weights_path=weights_path, frozen_stages=settings.frozen_stages
        )
        cpu_rewrites.for_training(model, runtime, settings, name)
    # The key this build's checkpoint answers to, with the real weights hash even right after a download.
    unit = context.unit
    key = cache.compute_key(
        unit.stage,
        unit.code_version,
        # The unit's own settings first: a curves unit's (its labels per class) stay in the checkpoint's key.
        {**unit.settings, **_settings(config, name, weights_sha256, runtime)},
        {label: upstream.key for label, upstream in unit.inputs},
    )
    input_size = settings.input_size or spec.preprocessing.input_size
    stored_size = settings.stored_size or crop_sizes(spec.preprocessing, input_size)[0]
    with timings.phase("data"):
        index = data.load_index(context.input_directory("download"))
        folder = images.store_folder(context.cache_root, unit.input("download").key)
        sets = images.load_image_sets(index, folder, stored_size, spec.preprocessing, input_size, context.log)
        if choose_train is not None:
            sets["train"] = sets["train"].subset(choose_train)
    checkpoint = context.directory / checkpoints.CHECKPOINT
    resume = checkpoints.read_checkpoint(checkpoint, key, context.log)
    probe = {}
    if resume is None and settings.linear_probe:
        probe = linear_probe(model, spec, sets, settings, runtime, context.log)
    job = train.FitJob(
        checkpoint,
        key,
        label=f"finetune {name}",
        log=context.log,
        resume=resume,
        freeze_batchnorm=settings.freeze_bn_stats,
        extra={"probe": probe},
    )
    groups = finetune_groups(model, spec, settings.backbone_lr_multiplier)
    result = train.fit(model, groups, sets["train"], sets["val"], settings, runtime, job)
    probe = result.extra.get("probe", {})
    selected = {"best_epoch": result.best_epoch}
    if probe:
        selected.update(probe_weight_decay=probe["weight_decay"], probe_val_top1=probe["val_top1"])
    record = {
        "arm": results.finetune_arm(name),
        "method": results.FINETUNE,
        "backbone": name,
        "head": results.FINETUNE_HEAD,
        "input_size": input_size,
        "stored_size": stored_size,
        "train_images": len(sets["train"]),
        "class_names": index.class_names,
        "selected": selected,
        "weights_sha256": weights_sha256,
        "weights_verified": weights_verified(spec, weights_path) if weights_path else "unknown",
        **(extra or {}),
    }
    phases = {
        "weights_seconds": timings.seconds.get("weights", 0.0),
        "data_seconds": timings.seconds.get("data", 0.0),
        "probe_seconds": probe.get("seconds", 0.0),
    }
    return finish_arm(
        context, model, result, sets["test"], runtime, record, phases, test_image_ids=index.image_ids["test"]
    )


STAGE = register_stage(
    Stage(
        name="finetune",
        description="Fine-tune pretrained backbones end to end (best epoch on val).",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
        distributed=True,
    )
)
