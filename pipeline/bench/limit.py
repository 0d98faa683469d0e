"""The limit rows: extraction against what the cores can do at best when they both decode and run the model.

On a CPU the same cores decode the JPEGs and run the network, so per image the work is t_decode (the
pixel path's decode, resize and crop, spread over the cores as extraction spreads it) plus t_model
(the model alone on tensors in memory, over the cores as extraction runs it), and no schedule beats
limit = 1 / (t_decode + t_model) img/s. Against thumbnails decoding is nearly free and the model-only
rate is the limit (the extraction rows); at full resolution decoding is not, and these rows say how
close extraction comes to the sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch

from .. import backbones, extract, frozen, pixels, transforms
from ..calibration import features_workload
from ..config import Config
from ..data import DatasetIndex
from ..runtime import Runtime, plan_runtime
from .extraction import decoding_scheme, forward_rate
from .options import BenchOptions
from .rows import make_row, rows_of, weights_path
from .statistics import median_interval
from .subsets import proportional_counts, subset_index

TARGET = 0.85
# The architecture users run, measured with random weights (nothing downloaded): its speed is the
# pretrained model's.
RANDOM_RESNET = "resnet18"


def decode_model_limit(decode_rate: float, model_rate: float) -> float:
    """img/s when the cores spend 1/decode_rate + 1/model_rate seconds of their time on each image."""
    return 1.0 / (1.0 / decode_rate + 1.0 / model_rate)


def limit_backbones(config: Config) -> list[tuple[str, str | None, str]]:
    """(backbone, weights file or None, label) of each row: every [features] backbone with the weights the
    stage uses, then ResNet-18 with random weights unless it is a features backbone already."""
    chosen = [(name, weights_path(config, name), name) for name in config.features.backbones]
    if RANDOM_RESNET not in config.features.backbones:
        chosen.append((RANDOM_RESNET, None, f"{RANDOM_RESNET} (random weights)"))
    return chosen


def decode_rate(jobs: list, batch_size: int, runtime: Runtime) -> float:
    """Rows/s of the jobs' pixels alone (decode, resize, crop; no model), decoded as extraction decodes them."""
    batches = extract.batch_plan(jobs, [0] * len(jobs), batch_size)
    started = time.perf_counter()
    for _ in extract.decoded_batches(jobs, batches, runtime):
        pass
    return rows_of(jobs) / (time.perf_counter() - started)


def limit_rows(
    config: Config, runtime: Runtime, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> list:
    """One row per backbone of limit_backbones: extraction img/s over the decode + model limit, in paired rounds."""
    subset = subset_index(index, proportional_counts(index, max(8, options.images // options.rounds)))
    rows = []
    for name, weights, label in limit_backbones(config):
        rows.append(_limit_row(config, name, weights, label, subset, options, work, log))
        log(
            f"[bench] {label}: extraction {rows[-1]['ours']:.1f} img/s, {rows[-1]['ratio']:.2f} of the "
            f"decode + model limit {rows[-1]['baseline']:.1f} img/s (median of {options.rounds} rounds)"
        )
    return rows


def _limit_row(
    config: Config,
    name: str,
    weights: str | None,
    label: str,
    subset: DatasetIndex,
    options: BenchOptions,
    work: Path,
    log: Callable,
) -> dict:
    """As in the extraction rows, the limit (L: a decode pass, then a model-only pass) and extraction (E)
    alternate over the same images, L E L E ... L, and each round divides E by the mean of the limits
    on either side of it; the row gives the median of those ratios."""
    runtime = plan_runtime(config.runtime, features_workload(config, name, Path(config.cache.root)))
    spec = backbones.get_backbone(name)
    _, input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
    model = frozen.load_frozen_backbone(
        name, weights, runtime.device, runtime.channels_last, config.features.fold_batchnorm, runtime.engine, input_size
    )
    evaluation, mean, std = pixels.eval_pipeline(spec.preprocessing, input_size)
    paths = [path for split in ("train", "val", "test") for path in subset.paths(split)]
    stacked = torch.stack([pixels.load_pixels(path, evaluation) for path in paths])
    batch = config.features.batch_size
    jobs = frozen.extraction_jobs(subset, config, spec, input_size)
    extracting = frozen.extraction_options(config, log, progress=False)
    count = rows_of(jobs)

    def limit() -> tuple[float, float]:
        return decode_rate(jobs, batch, runtime), forward_rate(model, stacked, mean, std, batch, runtime)

    passes, rates, ratios = [limit()], [], []
    for round_number in range(options.rounds):
        output = work / f"limit-{name}-{round_number}.h5"
        timings = extract.write_features(output, "bench", jobs, model, spec.feature_dim, runtime, extracting)
        output.unlink()
        rates.append(count / sum(record["seconds"] for record in timings.values()))
        passes.append(limit())
        around = [decode_model_limit(*part) for part in passes[-2:]]
        ratios.append(rates[-1] / (sum(around) / 2))
    return _row(label, name, input_size, runtime, passes, rates, ratios, count, len(paths), options)


def _row(
    label: str,
    name: str,
    input_size: int,
    runtime: Runtime,
    passes: list,
    rates: list,
    ratios: list,
    count: int,
    images: int,
    options: BenchOptions,
) -> dict:
    decode = float(numpy.median([part[0] for part in passes]))
    model = float(numpy.median([part[1] for part in passes]))
    limits = [decode_model_limit(*part) for part in passes]
    low, high = median_interval(ratios)
    extraction = float(numpy.median(rates))
    return make_row(
        "limit",
        f"{label} extraction img/s / decode + model limit img/s ({input_size} px)",
        extraction,
        float(numpy.median(limits)),
        "img/s",
        f">= {TARGET}",
        [("ratio", ">=", TARGET)],
        notes=f"limit = 1 / (t_decode + t_model): t_decode {1000 / decode:.2f} ms/row (decode, resize and crop "
        f"of the jobs' {count} rows alone, {decoding_scheme(runtime)}), t_model {1000 / model:.2f} ms/img (model-only "
        f"forward on {images} images in memory, {runtime.precision}, {runtime.inference_streams} stream(s)); "
        f"extraction = extract.write_features over those rows; {options.rounds} paired rounds, ratio = median "
        f"of the per-round ratios ({' / '.join(f'{value:.2f}' for value in ratios)}; 95% interval of the median "
        f"{low:.2f}-{high:.2f}); limits {' / '.join(f'{value:.1f}' for value in limits)} img/s, extraction "
        f"{' / '.join(f'{value:.1f}' for value in rates)} img/s; model-only {model:.1f} img/s, so extraction "
        f"is {extraction / model:.2f} of model-only and decoding takes {decode_share(decode, model):.0%} of "
        "the limit's time",
        ratio=float(numpy.median(ratios)),
        ratio_interval=[low, high],
        rows_timed=count * options.rounds,
        backbone=name,
        round_ratios=ratios,
        decode_rate=decode,
        model_rate=model,
        t_decode_ms=1000 / decode,
        t_model_ms=1000 / model,
    )


def decode_share(decode_rate: float, model_rate: float) -> float:
    """The part of the limit's time per image spent decoding."""
    return (1 / decode_rate) / (1 / decode_rate + 1 / model_rate)
