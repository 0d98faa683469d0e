"""The memory rows: peak resident memory of the features code path and of the fine-tune stage's data path,
each at two sizes, each size in a fresh process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .. import backbones, extract, frozen, images, transforms
from ..calibration import features_workload
from ..config import Config
from ..data import DatasetIndex
from ..runtime import resolve_runtime
from .options import BenchOptions
from .rows import make_row, rows_of, subprocess_environment, weights_path
from .subsets import proportional_counts, subset_index


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
    from ..config import config_from_dict

    spec = json.loads(Path(spec_path).read_text())
    config = config_from_dict(spec["config"])
    index = DatasetIndex.from_json(spec["index"])
    backbone = backbones.get_backbone(spec["backbone"])
    # The precision and engine the features stage uses for this backbone (its stored calibration).
    runtime = resolve_runtime(config.runtime, features_workload(config, backbone.name, Path(config.cache.root)))
    _, input_size = transforms.crop_sizes(backbone.preprocessing, config.features.input_size)
    model = frozen.load_frozen_backbone(
        backbone.name,
        spec["weights"],
        runtime.device,
        runtime.channels_last,
        config.features.fold_batchnorm,
        runtime.engine,
        input_size,
    )
    jobs = frozen.extraction_jobs(index, config, backbone, input_size)
    extract.write_features(
        Path(spec["output"]),
        "bench-memory",
        jobs,
        model,
        backbone.feature_dim,
        runtime,
        frozen.extraction_options(config, log=lambda line: None, progress=False),
    )
    print(json.dumps({"rows": rows_of(jobs), "peak_mib": peak_resident_mib()}))


def finetune_memory_probe(spec_path: str) -> None:
    """Child side of the fine-tune memory row: build the image cache of one subset, then one epoch of train
    batches (the config's augmentation) and the val and test eval batches; print its peak RSS as JSON."""
    import torch

    from ..config import config_from_dict

    spec = json.loads(Path(spec_path).read_text())
    config = config_from_dict(spec["config"])
    settings = config.finetune
    index = DatasetIndex.from_json(spec["index"])
    preprocessing = backbones.get_backbone(spec["backbone"]).preprocessing
    input_size = settings.input_size or preprocessing.input_size
    stored_size = settings.stored_size or transforms.crop_sizes(preprocessing, input_size)[0]
    sets = images.load_image_sets(
        index, Path(spec["output"]), stored_size, preprocessing, input_size, log=lambda line: None
    )
    generator = torch.Generator().manual_seed(config.runtime.seed)
    train = sets["train"]
    for positions in train.batches(settings.batch_size, generator, shuffle=True, drop_last=True):
        train.train_batch(positions, settings.augmentation, settings.minimum_crop_scale, generator)
    for split in ("val", "test"):
        for positions in sets[split].batches(2 * settings.batch_size):
            sets[split].eval_batch(positions)
    print(json.dumps({"rows": sum(len(part) for part in sets.values()), "peak_mib": peak_resident_mib()}))


def memory_rows(config: Config, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable) -> list:
    """Row 6: peak RSS of the features code path and, with a [finetune] backbone, of the fine-tune data path,
    each on half and all of a subset, each size in a fresh process."""
    sizes = f"{options.memory_images} vs {options.memory_images // 2} images"
    name = config.features.backbones[0]
    rows = [
        _memory_row(
            f"features peak memory ({name}): {sizes}",
            "memory_probe",
            {"backbone": name, "weights": weights_path(config, name)},
            "peak resident memory (VmHWM) of a fresh process running frozen.extraction_jobs + "
            "extract.write_features on {large} vs {small} rows (split proportions, augmented views included); "
            "its DataLoader workers are not counted",
            (config, index, options, work, log),
        )
    ]
    if config.finetune.backbones:
        name = config.finetune.backbones[0]
        rows.append(
            _memory_row(
                f"fine-tune data peak memory ({name}): {sizes}",
                "finetune_memory_probe",
                {"backbone": name},
                "peak resident memory (VmHWM) of a fresh process running images.load_image_sets (decoding every "
                f"split into a new uint8 cache), one epoch of train batches ({config.finetune.augmentation}) and "
                "the val and test eval batches, on {large} vs {small} images (split proportions)",
                (config, index, options, work, log),
            )
        )
    return rows


def _memory_row(what: str, probe: str, fields: dict, notes: str, study: tuple) -> dict:
    """One memory row: `probe` at both sizes; `notes` is formatted with the row counts {large} and {small}."""
    peaks, failure = _peaks(probe, fields, *study)
    if failure:
        return make_row(
            "memory",
            what,
            None,
            None,
            "MiB",
            "ratio <= 1.15",
            [("ratio", "<=", 1.15)],
            notes=f"not measured: {failure}",
        )
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
        notes=notes.format(large=large["rows"], small=small["rows"]),
    )


def _peaks(
    probe: str, fields: dict, config: Config, index: DatasetIndex, options: BenchOptions, work: Path, log: Callable
) -> tuple[dict, str | None]:
    """({size: probe output} at half and all of --memory-images, each in a fresh process; or what failed)."""
    peaks = {}
    for size in (options.memory_images // 2, options.memory_images):
        spec_path = work / f"{probe}-{size}.json"
        subset = subset_index(index, proportional_counts(index, size))
        spec_path.write_text(
            json.dumps(
                {
                    "config": config.to_dict(),
                    "index": subset.to_json(),
                    "output": str(work / f"{probe}-{size}"),
                    **fields,
                }
            )
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from pipeline.bench.memory import {probe}; {probe}(sys.argv[1])",
                str(spec_path),
            ],
            capture_output=True,
            text=True,
            env=subprocess_environment(),
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return peaks, f"the {probe} run on {size} images failed ({last})"
        peaks[size] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"[bench] {probe}: {peaks[size]['rows']} rows, peak {peaks[size]['peak_mib']:.0f} MiB")
    return peaks, None
