"""The compute rows of the [finetune] backbones and the finetune rows: our training step vs the notebook's loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from torch import nn

from .. import cpu_rewrites, images, optimization, train, transforms
from ..calibration import finetune_workload
from ..config import Config
from ..data import DatasetIndex
from ..runtime import Runtime, plan_runtime
from .notebook import time_notebook_steps
from .options import BenchOptions
from .protocol import WARMUP_STEPS
from .rows import make_row, weights_path
from .subsets import subset_index


def finetune_rows(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> tuple[list, list]:
    """Forward+backward compute-limit rows and per-epoch rows, one of each per [finetune] backbone."""
    from ..models import build_finetune_model

    settings = config.finetune
    frozen_stages = f"stem and {settings.frozen_stages} stage(s) frozen" if settings.frozen_stages else ""
    compute, epochs = [], []
    train_images = len(index.image_ids["train"])
    for name in settings.backbones:
        # The precision the finetune stage uses for this backbone (calibrated where auto on CPU).
        runtime = plan_runtime(config.runtime, finetune_workload(config, name, Path(config.cache.root)))
        weights = weights_path(config, name)
        model, spec = build_finetune_model(
            name, config.data.num_classes, weights_path=weights, frozen_stages=settings.frozen_stages
        )
        cpu_rewrites.for_training(model, runtime, settings, name)
        input_size = settings.input_size or spec.preprocessing.input_size
        stored_size = settings.stored_size or transforms.crop_sizes(spec.preprocessing, input_size)[0]
        subset = subset_index(index, {"train": (options.steps + WARMUP_STEPS) * settings.batch_size})
        train_set = images.load_image_sets(
            subset, work / f"images-{name}", stored_size, spec.preprocessing, input_size, log, splits=("train",)
        )["train"].to(runtime.device)
        runtime.place(model)
        criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        batches = list(
            train_set.batches(settings.batch_size, torch.Generator().manual_seed(0), shuffle=True, drop_last=True)
        )
        # Forward+backward only, on one batch already in memory: what the hardware allows per step.
        inputs = train_set.eval_batch(batches[0])
        labels = train_set.labels[batches[0]]
        measure_limit = "compute" in options.rows
        passes = (
            [backward_rate(model, inputs, labels, criterion, settings, runtime, options.steps)] if measure_limit else []
        )
        if "finetune" in options.rows:
            # Paired rounds, as the extraction rows pair theirs: ours, notebook, ours, notebook, ..., ours;
            # each round divides the mean of the two timings of ours around a notebook slice by that slice.
            ours_steps = [time_our_steps(model, spec, train_set, batches, settings, runtime, options.steps)]
            notebook_steps = []
            for _ in range(options.finetune_rounds):
                notebook_step, notebook_images = time_notebook_steps(
                    name, weights, index, input_size, options.steps * settings.batch_size, runtime, config.runtime.seed
                )
                notebook_steps.append(notebook_step)
                ours_steps.append(time_our_steps(model, spec, train_set, batches, settings, runtime, options.steps))
            round_ratios = [
                (ours_steps[number] + ours_steps[number + 1]) / 2 / settings.batch_size / notebook
                for number, notebook in enumerate(notebook_steps)
            ]
        if measure_limit and "finetune" in options.rows:
            # Again after our steps: speed drifts on a shared machine, and the faster pass is the limit.
            passes.append(backward_rate(model, inputs, labels, criterion, settings, runtime, options.steps))
        if "compute" in options.rows:
            folded = " and folded into the convolutions" if settings.freeze_bn_stats and settings.fold_batchnorm else ""
            folded += f"; {frozen_stages}" if frozen_stages else ""
            compute.append(
                make_row(
                    "compute",
                    f"{name} forward+backward (train, batch {settings.batch_size}, {input_size} px)",
                    max(passes),
                    None,
                    "img/s",
                    notes=f"{options.steps} steps after {WARMUP_STEPS} warm-up steps, "
                    f"{runtime.precision}, BatchNorm statistics frozen {settings.freeze_bn_stats}"
                    f"{folded}; "
                    f"best of {len(passes)} pass(es); reference, no target",
                )
            )
            log(f"[bench] {name}: model-only forward+backward {max(passes):.1f} img/s")
        del model
        if "finetune" not in options.rows:
            continue
        ours_epoch = train_images * float(numpy.median(ours_steps)) / settings.batch_size
        notebook_epoch = train_images * float(numpy.median(notebook_steps))
        ratio = float(numpy.median(round_ratios))
        epochs.append(
            make_row(
                "finetune",
                f"fine-tune epoch ({name}, {input_size} px): our training step vs notebook loop",
                ours_epoch,
                notebook_epoch,
                "s",
                ">= 2.5x faster (ratio <= 0.4)",
                [("ratio", "<=", 0.4)],
                notes=f"train pass of one epoch ({train_images} images; val pass excluded on both sides), in "
                f"{options.finetune_rounds} paired rounds; ratio = median of the per-round ratios "
                f"({' / '.join(f'{value:.3f}' for value in round_ratios)}), epochs from the median timings. Ours: "
                f"{options.steps} steps after {WARMUP_STEPS} warm-up, timed before the notebook's first slice and "
                f"after each ({' / '.join(f'{seconds:.3f}' for seconds in ours_steps)} s per step; uint8 cache, "
                f"batched {settings.augmentation}, batch "
                f"{settings.batch_size}, {runtime.precision}, channels_last {runtime.channels_last}, "
                f"{frozen_stages + ' as the recipe has them, ' if frozen_stages else ''}optimizer"
                f"{' + EMA' if settings.ema_decay else ''}). Notebook: fp32, batch 4, PIL decode + "
                f"RandomResizedCrop/flip per step via DataLoader, SGD 0.001 momentum 0.9, {notebook_images} images "
                f"after {WARMUP_STEPS} warm-up batches per slice "
                f"({' / '.join(f'{seconds:.4f}' for seconds in notebook_steps)} s per image).",
                ratio=ratio,
                speedup=1 / ratio,
                ours_step_seconds=ours_steps,
                notebook_image_seconds=notebook_steps,
                round_ratios=round_ratios,
                batch_size=settings.batch_size,
                train_images=train_images,
            )
        )
        log(f"[bench] {name}: epoch ours {ours_epoch:.0f} s vs notebook {notebook_epoch:.0f} s")
    return compute, epochs


def backward_rate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, criterion, settings, runtime: Runtime, steps: int
) -> float:
    """img/s of forward + loss + backward alone (no optimizer, no augmentation) in train mode, after warm-up steps."""
    inputs = inputs.contiguous(memory_format=torch.channels_last) if runtime.channels_last else inputs
    train.set_train_mode(model, settings.freeze_bn_stats)
    seconds = 0.0
    for step in range(steps + WARMUP_STEPS):
        runtime.synchronize()
        started = time.perf_counter()
        with runtime.autocast():
            loss = criterion(model(inputs).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        runtime.synchronize()
        seconds += (time.perf_counter() - started) if step >= WARMUP_STEPS else 0.0
    return steps * len(labels) / seconds


def time_our_steps(model, spec, train_set, batches: list, settings, runtime: Runtime, steps: int) -> float:
    """Seconds per training step of the pipeline's loop body (augment, step, EMA), after warm-up steps."""
    from ..models import finetune_groups

    optimizer = optimization.make_optimizer(finetune_groups(model, spec, settings.backbone_lr_multiplier), settings)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    average = optimization.WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(runtime.seed)
    train.set_train_mode(model, settings.freeze_bn_stats)
    seconds = 0.0
    for step in range(steps + WARMUP_STEPS):
        positions = batches[step % len(batches)]
        runtime.synchronize()
        started = time.perf_counter()
        inputs = train_set.train_batch(positions, settings.augmentation, settings.minimum_crop_scale, generator)
        # The training loop's own step, so the bench times the real thing.
        train.train_step(model, inputs, train_set.labels[positions], criterion, optimizer, scaler, runtime)
        if average is not None:
            average.update(model)
        runtime.synchronize()
        seconds += (time.perf_counter() - started) if step >= WARMUP_STEPS else 0.0
    return seconds / steps
