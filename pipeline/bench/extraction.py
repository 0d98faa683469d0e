"""The compute rows of the [features] backbones and the extraction rows: our extraction vs model-only forward."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from torch import nn

from .. import backbones, extract, frozen, pixels, transforms
from ..calibration import features_workload
from ..config import Config
from ..data import DatasetIndex
from ..runtime import Runtime, plan_runtime
from .options import BenchOptions
from .protocol import WARMUP_BATCHES
from .rows import make_row, rows_of, weights_path
from .statistics import median_interval
from .subsets import proportional_counts, subset_index


def decoding_scheme(runtime: Runtime) -> str:
    """Where extraction decodes its images, for the notes."""
    if runtime.inference_streams > 1:
        return f"{runtime.inference_streams} streams decoding their own batches"
    return f"{runtime.num_workers} workers" if runtime.num_workers else "decoding in the main process"


def forward_rate(
    model: nn.Module, rows: torch.Tensor, mean: tuple, std: tuple, batch_size: int, runtime: Runtime
) -> float:
    """Model-only img/s of a frozen backbone over uint8 `rows`, normalised in memory first, after warm-up batches.

    Run the way extraction runs them: runtime.inference_streams batches at once (extract.in_streams).
    """
    inputs = pixels.normalise(rows.to(runtime.device), mean, std)
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
        # The precision the features stage uses for this backbone (calibrated where auto on CPU).
        runtime = plan_runtime(config.runtime, features_workload(config, name, Path(config.cache.root)))
        spec = backbones.get_backbone(name)
        _, input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)
        model = frozen.load_frozen_backbone(
            name,
            weights_path(config, name),
            runtime.device,
            runtime.channels_last,
            config.features.fold_batchnorm,
            runtime.engine,
            input_size,
        )
        evaluation, mean, std = pixels.eval_pipeline(spec.preprocessing, input_size)
        paths = [path for split in ("train", "val", "test") for path in subset.paths(split)]
        stacked = torch.stack([pixels.load_pixels(path, evaluation) for path in paths])
        batch = config.features.batch_size
        passes = [forward_rate(model, stacked, mean, std, batch, runtime)]
        if "extraction" in options.rows:
            jobs = frozen.extraction_jobs(subset, config, spec, input_size)
            extracting = frozen.extraction_options(config, log, progress=False)
            rows, rates, ratios = rows_of(jobs), [], []
            for round_number in range(options.rounds):
                output = work / f"extraction-{name}-{round_number}.h5"
                timings = extract.write_features(output, "bench", jobs, model, spec.feature_dim, runtime, extracting)
                output.unlink()
                rates.append(rows / sum(record["seconds"] for record in timings.values()))
                passes.append(forward_rate(model, stacked, mean, std, batch, runtime))
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
                    f"{decoding_scheme(runtime)}, JPEG decode included) vs model-only forward over those "
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
                notes=f"{len(paths)} images in memory, {runtime.precision} in {runtime.engine}, "
                f"channels_last {runtime.channels_last}, "
                f"{runtime.inference_streams} stream(s) as in extraction, after {WARMUP_BATCHES} warm-up batches; "
                f"median of {len(passes)} pass(es); reference, no target",
            )
        )
        log(f"[bench] {name}: model-only forward {numpy.median(passes):.1f} img/s")
        del model, stacked
    return compute, efficiency
