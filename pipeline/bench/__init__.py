"""`make bench`: how fast the pipeline runs against its compute limit and against the notebook, in one run.

Every row holds what, ours, baseline, ratio (= ours / baseline; the extraction rows: the median of
paired round ratios), target, met (true, false, or null
when not measured or when the row has no target) and notes. Rows, in `SECTIONS` order:

- compute: model-only forward img/s of each [features] backbone (frozen, eval mode, features batch
  size and input size) and forward+backward img/s of each [finetune] backbone (train mode, finetune
  batch size and input size), on tensors already in memory, with the runtime's precision and layout.
- extraction: img/s of the features stage's own code path (extract.write_features over the jobs
  frozen.extraction_jobs builds) on a subset, over model-only forward img/s of those images, in
  paired rounds that alternate the two.
- limit: the same extraction over the limit of cores that both decode and run the model,
  1 / (t_decode + t_model), for every [features] backbone and a random-init ResNet-18, in paired rounds.
- decode: the pixel path's decoder against DCT-scaled, PIL and torchvision decoding (speed on one
  thread, pixel difference), and extraction's streams against DataLoader workers for decoding.
- frozen: extract + every head kind in [heads] kinds (the features and heads stages' functions)
  against the notebook's protocol, timed on a few images and extrapolated to its 25 epochs; its
  accuracy is approximated on cached features of its own augmentations (the notes say so).
- finetune: seconds per epoch of our training step against a notebook-style DataLoader loop.
- warm: wall time of `python -m stages.all` when every unit is cached (otherwise not measured).
- memory: peak resident memory of the features code path and of the fine-tune stage's data path (image
  cache build, one epoch of batches) at two dataset sizes, each in its own process.

Everything temporary lives in `<cache root>/bench/work-<pid>-*` and is removed at the end; rows
measured so far are kept in bench.partial.json, and bench.json is replaced atomically when all are done.
With `--resolution full` the rows read full-size JPEGs, synthesised once from thumbnails into
`<cache root>/bench/fullres-<digest>/` (fullres), or DATA_DIR's own when they are full-size.

The bench is a tool over the library, not one of its stages (stages/bench.py only calls `main`). One job a
module: options (BenchOptions and the flags), protocol (the warm-up counts and the notebook's numbers),
notebook (the notebook's protocol, replicated), extraction, limit, decoding, frozen, finetune, warm and
memory (one row family each), fullres (the full-resolution images), rows (a row, its `met` rule and what
the families share), statistics (the interval of a median), subsets (images spread over each split),
runner (one run, bench.json) and report (the table).
"""

from __future__ import annotations

from .options import add_arguments, options_from, study_arguments
from .report import format_table
from .runner import run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m stages.bench` / `make bench`."""
    from ..cli import guarded, load, parser

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
