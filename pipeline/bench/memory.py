"""The memory row: peak resident memory of the features code path at two sizes, each in a fresh process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .. import backbones, extract, frozen, transforms
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
    runtime = resolve_runtime(config.runtime)
    index = DatasetIndex.from_json(spec["index"])
    backbone = backbones.get_backbone(spec["backbone"])
    _, input_size = transforms.crop_sizes(backbone.preprocessing, config.features.input_size)
    model = frozen.load_frozen_backbone(
        backbone.name, spec["weights"], runtime.device, runtime.channels_last, config.features.fold_batchnorm
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
                ("import sys; from pipeline.bench.memory import memory_probe; memory_probe(sys.argv[1])"),
                str(spec_path),
            ],
            capture_output=True,
            text=True,
            env=subprocess_environment(),
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
        notes=f"peak resident memory (VmHWM) of a fresh process running frozen.extraction_jobs + "
        f"extract.write_features on {large['rows']} vs {small['rows']} rows (split proportions, "
        f"augmented views included); its DataLoader workers are not counted",
    )
