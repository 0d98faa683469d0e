"""The bench's rows and knobs: `BenchOptions`, its command-line flags and their one-line errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError
from .protocol import NOTEBOOK_BATCH, WARMUP_STEPS

SECTIONS = ("compute", "extraction", "limit", "decode", "frozen", "finetune", "warm", "memory")
# The rows a run measures without --rows: at the resolution given, the rows every figure so far comes
# from; at full resolution, the rows about decoding (the limit, the decoders) and the memory rows.
DEFAULT_ROWS = {
    "given": ("compute", "extraction", "frozen", "finetune", "warm", "memory"),
    "full": ("limit", "decode", "memory"),
}
RESOLUTIONS = tuple(DEFAULT_ROWS)


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
    rows: tuple = DEFAULT_ROWS["given"]
    # "given": the images as DATA_DIR holds them; "full": full-resolution JPEGs (bench/fullres.py)
    resolution: str = "given"
    synthesise_all: bool = False  # full resolution: synthesise every image, not only those the rows read


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
        default=None,
        help=f"comma-separated rows to measure, of {','.join(SECTIONS)} (default: "
        + "; ".join(f"{','.join(rows)} with --resolution {name}" for name, rows in DEFAULT_ROWS.items())
        + ")",
    )
    arguments.add_argument(
        "--resolution",
        choices=RESOLUTIONS,
        default=defaults.resolution,
        help="given: the images as DATA_DIR holds them; full: full-resolution JPEGs (shorter side 500 px), "
        "synthesised once under <cache root>/bench/ from thumbnails, or DATA_DIR's own when full-size "
        "(default: %(default)s)",
    )
    arguments.add_argument(
        "--synthesise-all",
        action="store_true",
        help="with --resolution full: synthesise every image, not only those the rows read",
    )

    def refuse(message: str):
        raise BenchError(f"{message}; see `python -m stages.bench --help`")

    arguments.error = refuse  # argparse's usage-plus-message would be several lines
    return arguments


def options_from(parsed: argparse.Namespace) -> BenchOptions:
    if parsed.force:
        raise BenchError("--force does not apply to bench: it always measures afresh and never rebuilds the study")
    if parsed.synthesise_all and parsed.resolution != "full":
        raise BenchError("--synthesise-all applies only with --resolution full")
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
        rows=tuple(parsed.rows or DEFAULT_ROWS[parsed.resolution]),
        resolution=parsed.resolution,
        synthesise_all=parsed.synthesise_all,
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
