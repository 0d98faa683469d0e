"""`make bench`: how fast the pipeline runs against its compute limit and against the notebook, in one run.

Every row holds what, ours, baseline, ratio (= ours / baseline; the extraction rows: the median of
paired round ratios), target, met (true, false, or null
when not measured or when the row has no target) and notes. Rows, in `SECTIONS` order:

- compute: model-only forward img/s of each [features] backbone (frozen, eval mode, features batch
  size and input size) and forward+backward img/s of each [finetune] backbone (train mode, finetune
  batch size and input size), on tensors already in memory, with the runtime's precision and layout.
- extraction: img/s of the features stage's own code path (extract.write_features over the jobs
  features.extraction_jobs builds) on a subset, over model-only forward img/s of those images, in
  paired rounds that alternate the two.
- frozen: extract + both heads (the features and heads stages' functions) against the notebook's
  protocol, timed on a few images and extrapolated to its 25 epochs; its accuracy is approximated
  on cached features of its own augmentations (the notes say so).
- finetune: seconds per epoch of our training step against a notebook-style DataLoader loop.
- warm: wall time of `python -m stages.all` when every unit is cached (otherwise not measured).
- memory: peak resident memory of the features code path at two dataset sizes, each in its own process.

Everything temporary lives in `<cache root>/bench/work-<pid>-*` and is removed at the end; rows
measured so far are kept in bench.partial.json, and bench.json is replaced atomically when all are done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy
import torch
from torch import nn

from . import backbones, cache, evaluate, extract, features, heads, images, train, transforms
from .config import Config
from .data import DatasetIndex
from .errors import PipelineError
from .runtime import Runtime, environment, resolve_runtime, seed_everything

SECTIONS = ("compute", "extraction", "frozen", "finetune", "warm", "memory")
FOLDER = "bench"
RESULT = "bench.json"
PARTIAL = "bench.partial.json"
PROJECT = Path(__file__).resolve().parents[1]
# Untimed batches/steps before every clock starts: the first passes pay one-off kernel selection and
# allocator growth, which a whole-dataset run amortises and a short timing would not.
WARMUP_BATCHES = 8
WARMUP_STEPS = 2
# The notebook's protocol (frozen arm and fine-tuning loop alike).
NOTEBOOK_BATCH = 4
NOTEBOOK_EPOCHS = 25
NOTEBOOK_LR = 1e-3
NOTEBOOK_MOMENTUM = 0.9
NOTEBOOK_STEP_SIZE = 7
NOTEBOOK_GAMMA = 0.1
NOTEBOOK_GROUP = "notebook_views"


class BenchError(PipelineError, ValueError):
    """A bad bench flag (one-line message)."""


@dataclass(frozen=True)
class BenchOptions:
    """Subset sizes and step counts: what keeps one bench run under 15 minutes on 2 CPU cores."""

    images: int = 5120  # extraction row: images (plus their augmented views) per backbone
    # A shared machine's speed drifts between back-to-back windows, so each paired round ratio is noisy;
    # the median's noise shrinks only with the square root of the rounds (docs/benchmarks.md).
    rounds: int = 15  # extraction row: paired rounds (model-only, extraction) over images / rounds each
    test_images: int = 0  # frozen row: test images for both accuracies; 0 = the whole test split
    notebook_images: int = 96  # frozen row: train and val images timed through the notebook's protocol
    notebook_views: int = 4  # frozen row: augmented views cycled by the notebook-accuracy approximation
    steps: int = 5  # finetune row: timed steps of ours (the notebook loop gets as many images)
    # Ours (bf16, batch 32) and the notebook (fp32, batch 4) load the machine differently, so a change in
    # its speed moves them unequally; the median of paired rounds weighs it on both sides.
    finetune_rounds: int = 3  # finetune row: paired rounds (ours, notebook, ours, ...); ratio = their median
    memory_images: int = 1024  # memory row: the larger size; the smaller is half of it
    warm_timeout: float = 300.0  # warm row: seconds before the `stages.all` subprocess is stopped
    rows: tuple = SECTIONS


# --- command line -----------------------------------------------------------------------------------


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; it must be >= {minimum}")
        return value

    return parse


def _sections(text: str) -> tuple:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r} names no valid row; choose from: {', '.join(SECTIONS)}")
    return chosen


def add_arguments(arguments: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench's own knobs on top of the shared --config/--data-dir/--device/--set; bad values are one-line errors."""
    defaults = BenchOptions()
    arguments.add_argument(
        "--images",
        type=_whole(8),
        default=defaults.images,
        help="extraction row: images per backbone (default: %(default)s)",
    )
    arguments.add_argument(
        "--rounds",
        type=_whole(1),
        default=defaults.rounds,
        help="extraction row: paired rounds of model-only forward and extraction, each over "
        "images / rounds (default: %(default)s)",
    )
    arguments.add_argument(
        "--test-images",
        type=_whole(0),
        default=defaults.test_images,
        help="frozen row: test images both accuracies use; 0 = all (default: %(default)s)",
    )
    arguments.add_argument(
        "--notebook-images",
        type=_whole((WARMUP_STEPS + 1) * NOTEBOOK_BATCH),
        default=defaults.notebook_images,
        help="frozen row: train and val images timed through the notebook protocol (default: %(default)s)",
    )
    arguments.add_argument(
        "--notebook-views",
        type=_whole(1),
        default=defaults.notebook_views,
        help="frozen row: augmented views the notebook-accuracy approximation cycles (default: %(default)s)",
    )
    arguments.add_argument(
        "--steps",
        type=_whole(1),
        default=defaults.steps,
        help="finetune row: timed training steps (default: %(default)s)",
    )
    arguments.add_argument(
        "--finetune-rounds",
        type=_whole(1),
        default=defaults.finetune_rounds,
        help="finetune row: paired rounds of our step and the notebook's loop (default: %(default)s)",
    )
    arguments.add_argument(
        "--memory-images",
        type=_whole(4),
        default=defaults.memory_images,
        help="memory row: images of the larger run; the smaller is half (default: %(default)s)",
    )
    arguments.add_argument(
        "--rows",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated rows to measure (default: all of {','.join(SECTIONS)})",
    )

    def refuse(message: str):
        raise BenchError(f"{message}; see `python -m stages.bench --help`")

    arguments.error = refuse  # argparse's usage-plus-message would be several lines
    return arguments


def options_from(parsed: argparse.Namespace) -> BenchOptions:
    if parsed.force:
        raise BenchError("--force does not apply to bench: it always measures afresh and never rebuilds the study")
    if parsed.images < 8 * parsed.rounds:
        raise BenchError(f"--images {parsed.images} gives fewer than 8 images to each of --rounds {parsed.rounds}")
    return BenchOptions(
        images=parsed.images,
        rounds=parsed.rounds,
        test_images=parsed.test_images,
        notebook_images=parsed.notebook_images,
        notebook_views=parsed.notebook_views,
        steps=parsed.steps,
        finetune_rounds=parsed.finetune_rounds,
        memory_images=parsed.memory_images,
        rows=tuple(parsed.rows),
    )


def study_arguments(parsed: argparse.Namespace) -> list[str]:
    """The arguments `make all` gets in the warm row: the same config, data, device and overrides."""
    command = ["--config", str(Path(parsed.config).resolve())]
    if parsed.data_dir:
        command += ["--data-dir", str(Path(parsed.data_dir).expanduser().resolve())]
    if parsed.device:
        command += ["--device", parsed.device]
    for override in parsed.overrides:
        command += ["--set", override]
    return command


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m stages.bench` / `make bench`."""
    from .cli import guarded, load, parser

    def action():
        arguments = add_arguments(
            parser(
                "Benchmark the pipeline against its compute limit and the notebook; "
                "writes <cache root>/bench/bench.json."
            )
        )
        parsed = arguments.parse_args(argv)
        options = options_from(parsed)
        report = run(load(parsed), options, study_arguments(parsed))
        print(format_table(report))

    return guarded(action)


# --- rows ---------------------------------------------------------------------------------------------


def make_row(
    section: str,
    what: str,
    ours,
    baseline,
    unit: str,
    target: str | None = None,
    rule: list | None = None,
    notes: str = "",
    **extra,
) -> dict:
    """One table row; `rule` is a list of (field, ">=" or "<=", number or field name) conditions that decide `met`."""
    ratio = ours / baseline if ours is not None and baseline else None
    row = {
        "section": section,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "unit": unit,
        "target": target,
        "rule": rule,
        "notes": notes,
        **extra,
    }
    row["met"] = rule_met(row)
    return row


def rule_met(row: dict) -> bool | None:
    """True/False from the row's rule; None when it has no rule or a value the rule needs is missing."""
    if not row.get("rule"):
        return None
    results = []
    for field, comparison, bound in row["rule"]:
        value = row.get(field)
        limit = row.get(bound) if isinstance(bound, str) else bound  # a string names another field
        if value is None or limit is None:
            return None
        results.append(value >= limit if comparison == ">=" else value <= limit)
    return all(results)


def median_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of `values`: the k-th smallest and k-th largest value,
    with k the largest rank at which the interval still covers the median with at least `confidence`.

    Each value falls below the median with probability 1/2, so the chance that fewer than k do is a
    binomial tail; with too few values for the confidence asked, the interval is the whole range.
    """
    ordered = sorted(float(value) for value in values)
    count = len(ordered)
    if not count:
        raise ValueError("no values")
    rank, tail = 1, 0.0
    while rank < (count + 1) // 2:
        tail += math.comb(count, rank - 1) / 2**count  # P(fewer than `rank` values below the median)
        if 2 * (tail + math.comb(count, rank) / 2**count) > 1 - confidence:
            break
        rank += 1
    return ordered[rank - 1], ordered[count - rank]


def evenly_spaced(count: int, wanted: int) -> numpy.ndarray:
    """`wanted` positions spread over 0..count-1 (the whole range when wanted >= count); no RNG involved."""
    if wanted >= count:
        return numpy.arange(count)
    return numpy.unique(numpy.linspace(0, count - 1, wanted).round().astype(numpy.int64))


def subset_index(index: DatasetIndex, counts: dict) -> DatasetIndex:
    """The index with `counts[split]` images of each split, spread over the split (so over the classes)."""
    picks = {split: evenly_spaced(len(ids), counts.get(split, len(ids))) for split, ids in index.image_ids.items()}
    return DatasetIndex(
        folder=index.folder,
        class_names=index.class_names,
        image_ids={split: index.image_ids[split][pick] for split, pick in picks.items()},
        labels={split: index.labels[split][pick] for split, pick in picks.items()},
        skipped=index.skipped,
    )


def proportional_counts(index: DatasetIndex, wanted: int) -> dict:
    """About `wanted` images in all, split like the dataset (at least one per split)."""
    sizes = {split: len(ids) for split, ids in index.image_ids.items()}
    total = sum(sizes.values())
    return {split: min(size, max(1, round(wanted * size / total))) for split, size in sizes.items()}


def weights_path(config: Config, name: str) -> str | None:
    """Local pretrained file of a backbone (fetched on first use, as the stages do); None for random-init ones."""
    spec = backbones.get_backbone(name)
    if spec.weights is None:
        return None
    return str(backbones.resolve_weights(spec, config.weights.get(name), allow_download=True))


def _decoding(runtime: Runtime) -> str:
    """Where extraction decodes its images, for the notes."""
    if runtime.inference_streams > 1:
        return f"{runtime.inference_streams} streams decoding their own batches"
    return f"{runtime.num_workers} workers" if runtime.num_workers else "decoding in the main process"


def _rows_of(jobs: list) -> int:
    return sum(len(job.paths) for job in jobs)


def stack_transformed(paths: list, transform) -> torch.Tensor:
    """The images (PIL, RGB) through `transform`, stacked; here, uint8 [N, H, W, 3] after the geometric part."""
    from PIL import Image

    stack = []
    for path in paths:
        with Image.open(path) as image:
            stack.append(transform(image.convert("RGB")))
    return torch.stack(stack)


def forward_rate(
    model: nn.Module, pixels: torch.Tensor, mean: tuple, std: tuple, batch_size: int, runtime: Runtime
) -> float:
    """Model-only img/s of a frozen backbone over `pixels`, normalised in memory first, after warm-up batches.

    Run the way extraction runs them: runtime.inference_streams batches at once (extract.in_streams).
    """
    inputs = extract.normalise(pixels.to(runtime.device), mean, std)
    if not runtime.channels_last:
        inputs = inputs.contiguous()
    batches = [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]

    def forward(batch):
        with torch.inference_mode(), runtime.autocast():
            model(batch)

    for _ in extract.in_streams(forward, (batches * WARMUP_BATCHES)[:WARMUP_BATCHES], runtime.inference_streams):
        pass
    runtime.synchronize()
    started = time.perf_counter()
    for _ in extract.in_streams(forward, batches, runtime.inference_streams):
        pass
    runtime.synchronize()
    return len(inputs) / (time.perf_counter() - started)


def extraction_rows(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> tuple[list, list]:
    """Compute-limit forward rows and extraction-efficiency rows, one of each per [features] backbone.

    Speed on a shared machine drifts within a minute by more than the margin the target leaves,
    so the two are measured in paired rounds, model-only (M) and extraction (E) alternating
    over the same images: M E M E M ... M. Each round's ratio divides E by the mean of the M passes
    on either side of it; the row reports the median ratio (and the median rates).
    """
    compute, efficiency = [], []
    subset = subset_index(index, proportional_counts(index, max(8, options.images // options.rounds)))
    for name in config.features.backbones:
        spec = backbones.get_backbone(name)
        _, input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
        model = features.load_frozen_backbone(
            name, weights_path(config, name), runtime.device, runtime.channels_last, config.features.fold_batchnorm
        )
        geometry, mean, std = extract.uint8_transform(transforms.eval_transform(spec.preprocessing, input_size))
        paths = [path for split in ("train", "val", "test") for path in subset.paths(split)]
        pixels, batch = stack_transformed(paths, geometry), config.features.batch_size
        passes = [forward_rate(model, pixels, mean, std, batch, runtime)]
        if "extraction" in options.rows:
            jobs = features.extraction_jobs(subset, config, spec, input_size)
            rows, rates, ratios = _rows_of(jobs), [], []
            for round_number in range(options.rounds):
                output = work / f"extraction-{name}-{round_number}.h5"
                timings = extract.write_features(
                    output,
                    "bench",
                    jobs,
                    model,
                    spec.feature_dim,
                    device=runtime.device,
                    autocast=runtime.autocast,
                    channels_last=runtime.channels_last,
                    batch_size=batch,
                    num_workers=runtime.num_workers,
                    streams=runtime.inference_streams,
                    attributes={},
                    log=log,
                    progress=False,
                )
                output.unlink()
                rates.append(rows / sum(record["seconds"] for record in timings.values()))
                passes.append(forward_rate(model, pixels, mean, std, batch, runtime))
                ratios.append(rates[-1] / ((passes[-2] + passes[-1]) / 2))
            ratio = float(numpy.median(ratios))
            low, high = median_interval(ratios)
            efficiency.append(
                make_row(
                    "extraction",
                    f"{name} extraction img/s / model-only forward img/s",
                    float(numpy.median(rates)),
                    float(numpy.median(passes)),
                    "img/s",
                    ">= 0.85",
                    [("ratio", ">=", 0.85)],
                    notes=f"extract.write_features over {rows} rows ({len(paths)} images of every split + "
                    f"{config.features.augmented_views} augmented views of the train ones, {len(jobs)} groups, "
                    f"{_decoding(runtime)}, JPEG decode included) vs model-only forward over those "
                    f"{len(paths)} images, in {options.rounds} paired rounds; ratio = median of the per-round "
                    f"ratios ({' / '.join(f'{value:.2f}' for value in ratios)}; 95% interval of the median "
                    f"{low:.2f}-{high:.2f}); extraction "
                    f"{' / '.join(f'{value:.1f}' for value in rates)} img/s, model-only "
                    f"{' / '.join(f'{value:.1f}' for value in passes)} img/s",
                    # The median of the paired ratios, not the ratio of the two medians.
                    ratio=ratio,
                    ratio_interval=[low, high],
                    rows_timed=rows * options.rounds,
                    backbone=name,
                    round_ratios=ratios,
                )
            )
            log(
                f"[bench] {name}: extraction {numpy.median(rates):.1f} img/s ({ratio:.2f} of model-only, "
                f"median of {options.rounds} rounds)"
            )
        compute.append(
            make_row(
                "compute",
                f"{name} forward (frozen, eval, batch {batch}, {input_size} px)",
                float(numpy.median(passes)),
                None,
                "img/s",
                notes=f"{len(paths)} images in memory, {runtime.precision}, channels_last {runtime.channels_last}, "
                f"{runtime.inference_streams} stream(s) as in extraction, after {WARMUP_BATCHES} warm-up batches; "
                f"median of {len(passes)} pass(es); reference, no target",
            )
        )
        log(f"[bench] {name}: model-only forward {numpy.median(passes):.1f} img/s")
        del model, pixels
    return compute, efficiency


# --- frozen arm vs the notebook's protocol ----------------------------------------------------------


class LabelledImages(torch.utils.data.Dataset):
    """(tensor, label) from a JPEG decoded and transformed on every access, as the notebook's loaders did."""

    def __init__(self, paths: list, labels, transform):
        self.paths, self.labels, self.transform = list(paths), numpy.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        from PIL import Image

        with Image.open(self.paths[position]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[position])


def notebook_train_transform(spec: backbones.BackboneSpec, input_size: int):
    """The notebook's training augmentation: torchvision's RandomResizedCrop defaults and a flip."""
    from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

    return Compose(
        [
            RandomResizedCrop(input_size),
            RandomHorizontalFlip(),
            ToTensor(),
            Normalize(spec.preprocessing.mean, spec.preprocessing.std),
        ]
    )


def timed_loop(loader, step: Callable, runtime: Runtime) -> tuple[int, float]:
    """(images timed, seconds) of `step` over a loader; the first WARMUP_STEPS batches only warm up."""
    counted, started = 0, None
    for number, (inputs, labels) in enumerate(loader, start=1):
        step(inputs.to(runtime.device), labels.to(runtime.device))
        runtime.synchronize()
        if number == WARMUP_STEPS:
            started = time.perf_counter()
        elif number > WARMUP_STEPS:
            counted += len(labels)
    if not counted:
        raise BenchError("too few images to time past the warm-up batch; raise --notebook-images or --steps")
    return counted, time.perf_counter() - started


def notebook_loader(paths, labels, transform, runtime: Runtime, seed: int):
    return torch.utils.data.DataLoader(
        LabelledImages(paths, labels, transform),
        batch_size=NOTEBOOK_BATCH,
        shuffle=True,
        num_workers=runtime.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def time_notebook_frozen(
    name: str, weights: str | None, index: DatasetIndex, input_size: int, count: int, runtime: Runtime, seed: int
) -> dict:
    """Seconds per image of the notebook's frozen arm: fp32, batch 4, JPEG + transforms every epoch, SGD head."""
    spec = backbones.get_backbone(name)
    model = backbones.build_backbone(
        name, pretrained=weights is not None, weights_path=weights, num_classes=len(index.class_names)
    ).to(runtime.device)
    model.requires_grad_(False)
    head = getattr(model, spec.head_attribute).requires_grad_(True)
    train_step = notebook_sgd_step(model, head.parameters())

    def val_step(inputs, labels):
        with torch.no_grad():
            model(inputs)

    picks = {split: evenly_spaced(len(index.image_ids[split]), count) for split in ("train", "val")}
    timed = {}
    for split, mode, step, transform in (
        ("train", True, train_step, notebook_train_transform(spec, input_size)),
        ("val", False, val_step, transforms.eval_transform(spec.preprocessing, input_size)),
    ):
        model.train(mode)
        every = index.paths(split)
        paths = [every[position] for position in picks[split]]
        loader = notebook_loader(paths, index.labels[split][picks[split]], transform, runtime, seed)
        timed[split] = timed_loop(loader, step, runtime)
    return {f"{split}_seconds_per_image": seconds / images for split, (images, seconds) in timed.items()} | {
        f"{split}_images_timed": images for split, (images, _) in timed.items()
    }


def train_notebook_head(
    views: numpy.ndarray, train_labels, val: tuple, test: tuple, num_classes: int, seed: int
) -> dict:
    """The notebook's head recipe on cached features: SGD 0.001 momentum 0.9, batch 4, StepLR(7, 0.1), 25 epochs.

    Epoch e trains on augmented view e mod K of every image (K = len(views)); the head of the
    best val epoch is tested, as a per-epoch-val training loop that keeps its best weights does.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(views.shape[-1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=NOTEBOOK_LR, momentum=NOTEBOOK_MOMENTUM)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=NOTEBOOK_STEP_SIZE, gamma=NOTEBOOK_GAMMA)
    criterion = nn.CrossEntropyLoss()
    labels = torch.as_tensor(train_labels, dtype=torch.int64)
    val_inputs, test_inputs = torch.from_numpy(val[0]), torch.from_numpy(test[0])
    best = (-1.0, 0, None)
    for epoch in range(NOTEBOOK_EPOCHS):
        inputs = torch.from_numpy(views[epoch % len(views)])
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), NOTEBOOK_BATCH):
            batch = order[start : start + NOTEBOOK_BATCH]
            optimizer.zero_grad()
            criterion(head(inputs[batch]), labels[batch]).backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            val_top1 = float((head(val_inputs).argmax(1).numpy() == val[1]).mean())
        if val_top1 > best[0]:
            best = (val_top1, epoch + 1, {key: value.clone() for key, value in head.state_dict().items()})
    head.load_state_dict(best[2])
    with torch.no_grad():
        predictions = head(test_inputs).argmax(1).numpy()
    return {
        "val_top1": best[0],
        "best_epoch": best[1],
        "test_top1": evaluate.classification_metrics(test[1], predictions, num_classes)["top1"],
    }


def fit_our_heads(config: Config, path: Path, num_classes: int) -> dict:
    """Both heads as the heads stage fits them (selection on val, optional refit), timed with loading; per kind."""
    seed_everything(config.runtime.seed)
    started = time.perf_counter()
    _, splits = heads.load_splits(path, config.heads.use_augmented_views)
    load_seconds = time.perf_counter() - started
    results = {}
    for kind in config.heads.kinds:
        started = time.perf_counter()
        chosen, _, payload = heads.select(kind, config.heads, splits, num_classes, config.runtime.seed)
        if config.heads.fit_on == "train+val":
            rows = [numpy.concatenate([splits["fit"][part], splits["val"][part]]) for part in (0, 1)]
            chosen, payload = heads.refit(kind, config.heads, chosen, *rows, num_classes, config.runtime.seed)
        predictions = heads.predictor(payload)(splits["test"][0])
        top1 = evaluate.classification_metrics(splits["test"][1], predictions, num_classes)["top1"]
        results[kind] = {
            "val_top1": chosen["val_top1"],
            "test_top1": top1,
            "seconds": time.perf_counter() - started + load_seconds / len(config.heads.kinds),
        }
    return {"heads": results, "splits": splits}


def frozen_row(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> dict:
    """Row 3 on the first [features] backbone: ours (extract + both heads) vs the notebook's frozen protocol."""
    name = config.features.backbones[0]
    spec = backbones.get_backbone(name)
    _, input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    weights = weights_path(config, name)
    test_count = options.test_images or len(index.image_ids["test"])
    tested = subset_index(index, {"test": test_count})
    # The notebook is timed in two slices, one on each side of ours, as the extraction rows pair their
    # rounds, so a slowdown of the machine during ours weighs on both sides.
    timings_around = [
        time_notebook_frozen(name, weights, index, input_size, options.notebook_images, runtime, config.runtime.seed)
    ]
    # Ours: the features stage's jobs (every train/val image, augmented views, the test images) and both heads.
    model = features.load_frozen_backbone(
        name, weights, runtime.device, runtime.channels_last, config.features.fold_batchnorm
    )
    jobs = features.extraction_jobs(tested, config, spec, input_size)
    common = {
        "device": runtime.device,
        "autocast": runtime.autocast,
        "channels_last": runtime.channels_last,
        "batch_size": config.features.batch_size,
        "num_workers": runtime.num_workers,
        "streams": runtime.inference_streams,
        "log": log,
        "progress": False,
    }
    log(f"[bench] frozen: extracting {_rows_of(jobs)} rows with {name} (ours)")
    path = work / f"frozen-{name}.h5"
    timings = extract.write_features(path, "bench", jobs, model, spec.feature_dim, attributes={}, **common)
    full_test = len(index.image_ids["test"])
    # With a test subset, our test extraction is scaled to the whole split so both sides cover the full study.
    extract_seconds = sum(
        record["seconds"] * (full_test / record["images"] if group == "test" else 1.0)
        for group, record in timings.items()
    )
    num_classes = len(index.class_names)
    ours = fit_our_heads(config, path, num_classes)
    ours_seconds = extract_seconds + sum(result["seconds"] for result in ours["heads"].values())
    chosen_kind = max(ours["heads"], key=lambda kind: ours["heads"][kind]["val_top1"])
    # The notebook's accuracy: its head recipe on cached features of its own augmented views.
    count = len(index.image_ids["train"])
    views_job = extract.Job(
        group=NOTEBOOK_GROUP,
        paths=index.paths("train") * options.notebook_views,
        labels=numpy.tile(index.labels["train"], options.notebook_views),
        image_ids=numpy.tile(index.image_ids["train"], options.notebook_views),
        views=numpy.repeat(numpy.arange(1, options.notebook_views + 1), count),
        transform=notebook_train_transform(spec, input_size),
        seed=config.runtime.seed,
    )
    log(f"[bench] frozen: extracting {options.notebook_views} notebook-style views of {count} train images")
    views_path = work / f"notebook-{name}.h5"
    extract.write_features(views_path, "bench-notebook", [views_job], model, spec.feature_dim, attributes={}, **common)
    del model
    views = extract.read_group(views_path, NOTEBOOK_GROUP)["features"].reshape(options.notebook_views, count, -1)
    splits = ours["splits"]
    notebook = train_notebook_head(
        views, index.labels["train"], splits["val"], splits["test"], num_classes, config.runtime.seed
    )
    # The notebook's time: its protocol run for real on a few images, extrapolated to 25 epochs of train + val
    # and one test pass.
    timings_around.append(
        time_notebook_frozen(name, weights, index, input_size, options.notebook_images, runtime, config.runtime.seed)
    )
    timing = {
        key: (
            sum(part[key] for part in timings_around) / len(timings_around)
            if key.endswith("per_image")
            else sum(part[key] for part in timings_around)
        )
        for key in timings_around[0]
    }
    slice_seconds = " / ".join(
        f"{part['train_seconds_per_image'] + part['val_seconds_per_image']:.4f}" for part in timings_around
    )
    sizes = {split: len(index.image_ids[split]) for split in ("train", "val")}
    training_seconds = NOTEBOOK_EPOCHS * sum(sizes[split] * timing[f"{split}_seconds_per_image"] for split in sizes)
    # Its one test pass, at its val loop's speed per image: the test top-1 this row compares needs that
    # pass, as ours needs its test extraction, which is counted.
    test_seconds = full_test * timing["val_seconds_per_image"]
    notebook_seconds = training_seconds + test_seconds
    head_text = ", ".join(
        f"{kind} val {result['val_top1']:.3f} test {result['test_top1']:.3f}" for kind, result in ours["heads"].items()
    )
    notes = (
        f"{name}, {input_size} px. Ours: extract.write_features of {_rows_of(jobs)} rows (train, val, "
        f"{config.features.augmented_views} augmented views, {test_count} test images"
        + (f", test time scaled to all {full_test}" if test_count < full_test else "")
        + f") + both heads ({head_text}); ours = the {chosen_kind} head (best val). Notebook time: its protocol "
        f"(fp32, batch 4, JPEG + RandomResizedCrop/flip for train, resize/centre-crop for val, SGD head) run on "
        f"{timing['train_images_timed']} train + {timing['val_images_timed']} val images in two slices, before "
        f"and after ours ({WARMUP_STEPS} warm-up batches of each not counted; seconds per image "
        f"{slice_seconds} for train + val, averaged), extrapolated to {NOTEBOOK_EPOCHS} epochs x "
        f"({sizes['train']} train + {sizes['val']} val) = {training_seconds:.0f} s, plus one pass over the "
        f"{full_test} test images at its val speed = {test_seconds:.0f} s (without that pass, ours would be "
        f"{training_seconds / ours_seconds:.1f}x faster). Notebook accuracy APPROXIMATED: "
        f"its head recipe (SGD 0.001 "
        f"momentum 0.9, batch 4, StepLR 7/0.1, {NOTEBOOK_EPOCHS} epochs, best val epoch {notebook['best_epoch']}) "
        f"on cached {runtime.precision} eval-mode features of {options.notebook_views} notebook-style augmented "
        f"views per train image, cycled over the epochs; both accuracies on the same {test_count} test images."
    )
    log(
        f"[bench] frozen: ours {ours_seconds:.0f} s test {ours['heads'][chosen_kind]['test_top1']:.3f}; notebook "
        f"~{notebook_seconds:.0f} s test {notebook['test_top1']:.3f}"
    )
    return make_row(
        "frozen",
        f"frozen arm ({name}): extract + both heads vs notebook protocol",
        ours_seconds,
        notebook_seconds,
        "s",
        ">= 15x faster (ratio <= 0.0667) at equal or better test top-1",
        [("ratio", "<=", 1 / 15), ("ours_test_top1", ">=", "baseline_test_top1")],
        notes,
        ours_test_top1=ours["heads"][chosen_kind]["test_top1"],
        baseline_test_top1=notebook["test_top1"],
        baseline_val_top1=notebook["val_top1"],
        test_images=test_count,
        ours_heads=ours["heads"],
        ours_extract_seconds=extract_seconds,
        backbone=name,
        ours_extract_rate=_rows_of(jobs) / sum(record["seconds"] for record in timings.values()),
        notebook_timing=timing,
        notebook_timing_slices=timings_around,
        notebook_training_seconds=training_seconds,
        notebook_test_seconds=test_seconds,
        speedup=notebook_seconds / ours_seconds,
    )


# --- fine-tuning epoch vs the notebook's loop ------------------------------------------------------


def finetune_rows(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> tuple[list, list]:
    """Forward+backward compute-limit rows and per-epoch rows, one of each per [finetune] backbone."""
    from .models import build_finetune_model, rewrite_for_finetuning

    settings = config.finetune
    compute, epochs = [], []
    train_images = len(index.image_ids["train"])
    for name in settings.backbones:
        weights = weights_path(config, name)
        model, spec = build_finetune_model(name, config.data.num_classes, weights_path=weights)
        rewrite_for_finetuning(model, name, settings)
        input_size = settings.input_size or spec.preprocessing.input_size
        stored_size = settings.stored_size or transforms.crop_sizes(spec.preprocessing, input_size)[0]
        subset = subset_index(index, {"train": (options.steps + WARMUP_STEPS) * settings.batch_size})
        pixels = images.load_split(subset, "train", stored_size, work / f"images-{name}", log)
        train_set = images.ImageSet(pixels, torch.as_tensor(subset.labels["train"]), spec.preprocessing, input_size).to(
            runtime.device
        )
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
                f"{settings.batch_size}, {runtime.precision}, channels_last {runtime.channels_last}, optimizer"
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
    from .models import finetune_groups

    optimizer = train.make_optimizer(finetune_groups(model, spec, settings.backbone_lr_multiplier), settings)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    average = train.WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
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


def notebook_sgd_step(model: nn.Module, parameters) -> Callable:
    """One notebook training step (SGD 0.001, momentum 0.9, cross-entropy) over `parameters`."""
    optimizer = torch.optim.SGD(parameters, lr=NOTEBOOK_LR, momentum=NOTEBOOK_MOMENTUM)
    criterion = nn.CrossEntropyLoss()

    def step(inputs, labels):
        optimizer.zero_grad()
        criterion(model(inputs), labels).backward()
        optimizer.step()

    return step


def time_notebook_steps(
    name: str, weights: str | None, index: DatasetIndex, input_size: int, count: int, runtime: Runtime, seed: int
) -> tuple[float, int]:
    """(seconds per image, images timed) of a notebook-style fine-tuning loop: fp32, batch 4, decode every step."""
    from .models import build_finetune_model

    model, spec = build_finetune_model(name, len(index.class_names), weights_path=weights)
    model.to(runtime.device).train()
    step = notebook_sgd_step(model, model.parameters())
    picks = evenly_spaced(len(index.image_ids["train"]), count + WARMUP_STEPS * NOTEBOOK_BATCH)
    every = index.paths("train")
    paths = [every[position] for position in picks]
    loader = notebook_loader(
        paths, index.labels["train"][picks], notebook_train_transform(spec, input_size), runtime, seed
    )
    counted, seconds = timed_loop(loader, step, runtime)
    return seconds / counted, counted


# --- warm `make all` and peak memory --------------------------------------------------------------


def _subprocess_environment() -> dict:
    # The same code as this process, whatever the working directory.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}


def uncached_units(config: Config) -> list[str]:
    """Every unit of every stage `make all` would build under this config, with why; empty when all are valid."""
    from .graph import Graph, stages

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
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_subprocess_environment())
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


def peak_resident_mib() -> float:
    """Peak resident memory of this process's own address space (VmHWM), in MiB.

    Not ru_maxrss: Linux carries that across execve, so a child started from the (large) bench
    process would report at least the bench's own size, whatever the child did.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the best there is


def memory_probe(spec_path: str) -> None:
    """Child side of the memory row: run the features code path on one subset, print its peak RSS as JSON."""
    from .config import config_from_dict

    spec = json.loads(Path(spec_path).read_text())
    config = config_from_dict(spec["config"])
    runtime = resolve_runtime(config.runtime)
    index = DatasetIndex.from_json(spec["index"])
    backbone = backbones.get_backbone(spec["backbone"])
    _, input_size = transforms.crop_sizes(backbone.preprocessing, config.features.input_size)
    model = features.load_frozen_backbone(
        backbone.name, spec["weights"], runtime.device, runtime.channels_last, config.features.fold_batchnorm
    )
    jobs = features.extraction_jobs(index, config, backbone, input_size)
    extract.write_features(
        Path(spec["output"]),
        "bench-memory",
        jobs,
        model,
        backbone.feature_dim,
        device=runtime.device,
        autocast=runtime.autocast,
        channels_last=runtime.channels_last,
        batch_size=config.features.batch_size,
        num_workers=runtime.num_workers,
        streams=runtime.inference_streams,
        attributes={},
        log=lambda line: None,
        progress=False,
    )
    print(json.dumps({"rows": _rows_of(jobs), "peak_mib": peak_resident_mib()}))


def memory_row(config: Config, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable) -> dict:
    """Row 6: peak RSS of the features code path on half and all of a subset, each in a fresh process."""
    name = config.features.backbones[0]
    weights = weights_path(config, name)
    what = f"features peak memory ({name}): {options.memory_images} vs {options.memory_images // 2} images"
    peaks = {}
    for size in (options.memory_images // 2, options.memory_images):
        spec_path = work / f"memory-{size}.json"
        subset = subset_index(index, proportional_counts(index, size))
        spec_path.write_text(
            json.dumps(
                {
                    "config": config.to_dict(),
                    "index": subset.to_json(),
                    "backbone": name,
                    "weights": weights,
                    "output": str(work / f"memory-{size}.h5"),
                }
            )
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                ("import sys; from pipeline.bench import memory_probe; memory_probe(sys.argv[1])"),
                str(spec_path),
            ],
            capture_output=True,
            text=True,
            env=_subprocess_environment(),
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return make_row(
                "memory",
                what,
                None,
                None,
                "MiB",
                "ratio <= 1.15",
                [("ratio", "<=", 1.15)],
                notes=f"not measured: the features run on {size} images failed ({last})",
            )
        peaks[size] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"[bench] memory: {peaks[size]['rows']} rows, peak {peaks[size]['peak_mib']:.0f} MiB")
    small, large = (peaks[size] for size in sorted(peaks))
    return make_row(
        "memory",
        what,
        large["peak_mib"],
        small["peak_mib"],
        "MiB",
        "ratio <= 1.15 (flat)",
        [("ratio", "<=", 1.15)],
        peaks={str(size): peak for size, peak in peaks.items()},
        notes=f"peak resident memory (VmHWM) of a fresh process running features.extraction_jobs + "
        f"extract.write_features on {large['rows']} vs {small['rows']} rows (split proportions, "
        f"augmented views included); its DataLoader workers are not counted",
    )


# --- the run and its table --------------------------------------------------------------------------


def _sweep_stale_work(folder: Path) -> None:
    """Remove work folders of benches that were killed (their pid no longer runs)."""
    for stale in folder.glob("work-*"):
        try:
            os.kill(int(stale.name.split("-")[1]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def run(config: Config, options: BenchOptions, arguments: list[str] | None = None, log: Callable = print) -> dict:
    """Measure the selected rows, write <cache root>/bench/bench.json atomically and return the report."""
    from .download import load_index
    from .graph import Graph

    started = time.perf_counter()
    runtime = resolve_runtime(config.runtime)
    folder = Path(config.cache.root) / FOLDER
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": False,
        "config_source": config.source,
        "options": asdict(options),
        "environment": environment(runtime),
        # Other work on the machine slows every row; the 1-minute load average shows whether there was any.
        "load_average_at_start": os.getloadavg()[0],
        "rows": [],
    }

    def record(rows: list) -> None:
        report["rows"].extend(rows)
        cache.write_json_atomic(folder / PARTIAL, report)

    folder.mkdir(parents=True, exist_ok=True)
    _sweep_stale_work(folder)
    if "warm" in options.rows:
        # First, before anything of ours runs, so the study's cache is exactly as the user left it.
        record(
            [warm_row(config, arguments or ["--config", str(Path(config.source).resolve())], options.warm_timeout, log)]
        )
    graph = Graph(config, log=log)
    graph.run("download")
    index = load_index(graph.directory(graph.units("download")[0]))
    report["subsets"] = {
        "extraction_images": sum(proportional_counts(index, options.images).values()),
        "test_images": options.test_images or len(index.image_ids["test"]),
        "notebook_timed_images": options.notebook_images,
        "notebook_views": options.notebook_views,
        "finetune_steps": options.steps,
        "memory_images": [options.memory_images // 2, options.memory_images],
        "split_sizes": {split: len(ids) for split, ids in index.image_ids.items()},
    }
    with tempfile.TemporaryDirectory(prefix=f"work-{os.getpid()}-", dir=folder) as temporary:
        work = Path(temporary)
        if {"compute", "extraction"} & set(options.rows):
            record([row for part in extraction_rows(config, runtime, index, options, work, log) for row in part])
        if "frozen" in options.rows:
            frozen = frozen_row(config, runtime, index, options, work, log)
            for row in report["rows"]:
                if row["section"] == "extraction" and row["backbone"] == frozen["backbone"]:
                    # The same code path over the whole study, where start-up costs are amortised; unpaired,
                    # so a change in the machine's speed since the rounds moves this ratio.
                    row["notes"] += (
                        f"; the frozen row's full extraction ran at {frozen['ours_extract_rate']:.1f} "
                        f"img/s ({frozen['ours_extract_rate'] / row['baseline']:.2f} of the median "
                        f"model-only rate, unpaired: a minute or two later)"
                    )
            record([frozen])
        if {"compute", "finetune"} & set(options.rows):
            record([row for part in finetune_rows(config, runtime, index, options, work, log) for row in part])
        if "memory" in options.rows:
            record([memory_row(config, index, options, work, log)])
    report["rows"].sort(key=lambda row: SECTIONS.index(row["section"]))
    report.update(complete=True, seconds=time.perf_counter() - started, load_average_at_end=os.getloadavg()[0])
    cache.write_json_atomic(folder / RESULT, report)
    (folder / PARTIAL).unlink(missing_ok=True)
    report["path"] = str(folder / RESULT)
    return report


def _number(value, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def format_table(report: dict) -> str:
    """The rows as a Markdown table with numbered notes below it, and where bench.json is."""
    lines = ["| # | what | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    notes = []
    for number, row in enumerate(report["rows"], start=1):
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        if row.get("speedup"):
            ratio += f" ({row['speedup']:.1f}x faster)"
        if row.get("ours_test_top1") is not None:
            ratio += f"; test top-1 {row['ours_test_top1']:.3f} vs {row['baseline_test_top1']:.3f}"
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {number} | {row['what']} | {_number(row['ours'], row['unit'])} | "
            f"{_number(row['baseline'], row['unit'])} | {ratio} | {row['target'] or '-'} | {met} |"
        )
        notes.append(f"{number}. {row['notes']}")
    seconds = report.get("seconds")
    footer = []
    if seconds is not None:
        footer.append(
            f"bench: {seconds:.0f} s in all (load average {report['load_average_at_start']:.1f} at the "
            f"start, {report['load_average_at_end']:.1f} at the end); {report.get('path', '')}"
        )
    return "\n".join(lines + [""] + notes + [""] + footer)
