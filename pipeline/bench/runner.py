"""One bench run: the selected rows in order, recorded as they come, and bench.json written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from .. import atomic, calibration
from ..config import Config
from ..runtime import environment, resolve_runtime
from .decoding import decode_rows
from .extraction import extraction_rows
from .finetune import finetune_rows
from .frozen import frozen_row
from .fullres import full_resolution_index
from .limit import limit_rows
from .memory import memory_rows
from .options import SECTIONS, BenchOptions
from .report import FOLDER, PARTIAL, RESULT
from .subsets import proportional_counts
from .warm import warm_row


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
    from ..data import load_index
    from ..graph import Graph

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
        if options.resolution == "full":
            for row in rows:
                if row["section"] != "warm":  # the warm row times the study itself, at its own resolution
                    row["what"] += " [full resolution]"
        report["rows"].extend(rows)
        atomic.write_json_atomic(folder / PARTIAL, report)

    folder.mkdir(parents=True, exist_ok=True)
    _sweep_stale_work(folder)
    if "warm" in options.rows:
        # First, before anything of ours runs, so the study's cache is exactly as the user left it.
        record(
            [warm_row(config, arguments or ["--config", str(Path(config.source).resolve())], options.warm_timeout, log)]
        )
    graph = Graph(config, log=log)
    graph.run("download")
    download = graph.units("download")[0]
    index = load_index(graph.directory(download))
    report["resolution"] = {"mode": options.resolution}
    if options.resolution == "full":
        # Every row below reads the same splits, pointed at full-size images (made once, then reused).
        resolution = full_resolution_index(index, download.key, options, Path(config.cache.root), log)
        index, report["resolution"] = resolution.index, resolution.to_json()
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
        if "limit" in options.rows:
            record(limit_rows(config, runtime, index, options, work, log))
        if "decode" in options.rows:
            record(decode_rows(config, index, options, log))
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
            record(memory_rows(config, index, options, work, log))
    report["rows"].sort(key=lambda row: SECTIONS.index(row["section"]))
    # The stages' precision = "auto" decisions stored for this machine by the end (the warm row plans them).
    report["calibration"] = calibration.stored_decisions(Path(config.cache.root), log=log)
    report.update(complete=True, seconds=time.perf_counter() - started, load_average_at_end=os.getloadavg()[0])
    atomic.write_json_atomic(folder / RESULT, report)
    (folder / PARTIAL).unlink(missing_ok=True)
    report["path"] = str(folder / RESULT)
    return report
