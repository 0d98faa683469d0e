"""The samples stage: a grid of training images with class names, split sizes, class distribution."""

from __future__ import annotations

import io

import numpy

from .. import atomic, data
from ..config import Config
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage
from ..pixels import open_rgb

GRID = "grid.png"
SIZES_JSON = "sizes.json"
SIZES_TEXT = "sizes.txt"
DISTRIBUTION = "class_distribution.png"
CODE_VERSION = "2"  # 2: one panel per split in the class distribution


def plan(config: Config, graph) -> list[Unit]:
    settings = {"samples": config.section("samples"), "seed": config.runtime.seed}
    return [
        Unit(
            stage="samples",
            name="flowers-102",
            code_version=CODE_VERSION,
            settings=settings,
            inputs=(("download", graph.units("download")[0]),),
        )
    ]


def dataset_sizes(index: data.DatasetIndex) -> dict:
    """Images per split and per class (by name), as written to sizes.json."""
    per_class = []
    for number, name in enumerate(index.class_names):
        counts = {split: int(numpy.sum(index.labels[split] == number)) for split in data.SPLITS}
        per_class.append({"label": number, "name": name, **counts, "total": sum(counts.values())})
    splits = {split: int(len(index.labels[split])) for split in data.SPLITS}
    sizes = {
        "splits": splits,
        "total": sum(splits.values()),
        "num_classes": len(index.class_names),
        "per_class": per_class,
    }
    if index.files is not None:  # other dataset kinds say how their splits were made (Flowers' are official)
        sizes["split_note"] = index.split_note
    return sizes


def format_sizes(sizes: dict) -> str:
    """A plain-text table: split sizes, then every class with its count per split."""
    lines = [
        "split   images",
        *(f"{split:<7} {count:>6}" for split, count in sizes["splits"].items()),
        f"{'total':<7} {sizes['total']:>6}",
        "",
        f"{'label':>5}  {'class':<28} {'train':>5} {'val':>5} {'test':>5} {'total':>5}",
    ]
    for row in sizes["per_class"]:
        lines.append(
            f"{row['label']:>5}  {row['name'][:28]:<28} {row['train']:>5} {row['val']:>5} "
            f"{row['test']:>5} {row['total']:>5}"
        )
    return "\n".join(lines) + "\n"


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def draw_grid(index: data.DatasetIndex, rows: int, columns: int, tile_pixels: int, seed: int) -> bytes:
    """PNG bytes of randomly chosen training images, one class per tile where possible, titled by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    generator = numpy.random.default_rng(seed)
    labels = index.labels["train"]
    classes = generator.permutation(numpy.unique(labels))
    picks = []
    for tile in range(rows * columns):
        wanted = classes[tile % len(classes)]
        candidates = numpy.flatnonzero(labels == wanted)
        picks.append(int(generator.choice(candidates)))
    inches = tile_pixels / 100
    figure, axes = pyplot.subplots(rows, columns, figsize=(columns * inches, rows * inches * 1.2), squeeze=False)
    paths = index.paths("train")
    for axis, position in zip(axes.flat, picks, strict=True):
        axis.imshow(numpy.asarray(open_rgb(paths[position])))
        axis.set_title(index.class_names[labels[position]], fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    png = _figure_bytes(figure)
    pyplot.close(figure)
    return png


def draw_distribution(sizes: dict) -> bytes:
    """PNG bytes of images per class, one panel per split sharing the class axis: each split on its own
    scale, so train and val (10 per class in Flowers-102) stay as visible as test's hundreds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    rows = sizes["per_class"]
    positions = numpy.arange(len(rows))
    figure, axes = pyplot.subplots(
        len(data.SPLITS), 1, figsize=(max(8, len(rows) * 0.12), 1.6 * len(data.SPLITS) + 0.8), sharex=True
    )
    for axis, split, colour in zip(axes, data.SPLITS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        counts = numpy.array([row[split] for row in rows])
        axis.bar(positions, counts, width=0.85, color=colour)
        axis.set_ylim(0, max(1, counts.max()) * 1.15)
        axis.set_ylabel("images")
        per_class = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()} to {counts.max()}"
        axis.set_title(f"{split}: {sizes['splits'][split]} images, {per_class} per class", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("class label")
    axes[-1].set_xlim(-1, len(rows))
    figure.suptitle(f"Images per class ({sizes['total']} in all, {sizes['num_classes']} classes)")
    figure.tight_layout()
    png = _figure_bytes(figure)
    pyplot.close(figure)
    return png


def build(context: BuildContext) -> BuildResult:
    index = data.load_index(context.input_directory("download"))
    settings = context.config.samples
    sizes = dataset_sizes(index)
    atomic.write_json_atomic(context.directory / SIZES_JSON, sizes)
    table = format_sizes(sizes)
    atomic.write_text_atomic(context.directory / SIZES_TEXT, table)
    context.log(table.rstrip())
    atomic.write_bytes_atomic(
        context.directory / GRID,
        draw_grid(index, settings.rows, settings.columns, settings.tile_pixels, context.config.runtime.seed),
    )
    atomic.write_bytes_atomic(context.directory / DISTRIBUTION, draw_distribution(sizes))
    context.log(f"[samples] wrote {context.directory / GRID} and {context.directory / DISTRIBUTION}")
    return BuildResult(files=[GRID, SIZES_JSON, SIZES_TEXT, DISTRIBUTION], metrics={"splits": sizes["splits"]})


STAGE = register_stage(
    Stage(
        name="samples",
        description="Sample grid, dataset sizes and class distribution.",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
    )
)
