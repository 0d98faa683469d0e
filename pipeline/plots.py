"""The report's figures as PNG bytes (matplotlib's Agg canvas, no pyplot state, no display needed)."""

from __future__ import annotations

import io

import numpy

from .results import END_TO_END, METHODS, summarize

_STYLES = {method.name: method.style for method in METHODS}  # method -> (colour, marker)


def _figure(width: float, height: float, rows: int = 1, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _png(figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _finish(figure, axis, x_label: str, title: str, dpi: int, legend_title: str | None = "arm", font: int = 8) -> bytes:
    """Labels, grid and a legend beside the axes (long arm names never cover the data), as PNG bytes."""
    axis.set_xlabel(x_label)
    axis.set_ylabel("test top-1 %")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=font, borderaxespad=0)
    return _png(figure, dpi)


def accuracy_against_time(records: list[dict], dpi: int = 100) -> bytes | None:
    """Test top-1 against total seconds, one marker per present arm (means over its runs) with its 95%
    bootstrap interval as an error bar. Each marker carries a number and the arm names are listed beside
    the plot under those numbers, so long names never print over each other or over a marker."""
    points = [
        row
        for row in summarize(records)
        if row["test_top1_mean"] is not None and row["total_seconds_mean"] is not None and row["total_seconds_mean"] > 0
    ]
    if not points:
        return None
    figure, axes = _figure(11, 5)
    axis = axes[0, 0]
    styles = {method.name: method.style for method in METHODS}
    for number, row in enumerate(points, 1):
        colour, marker = styles[row["method"]]
        x, y = row["total_seconds_mean"], 100 * row["test_top1_mean"]
        if row["test_top1_low"] is not None:
            error = [[y - 100 * row["test_top1_low"]], [100 * row["test_top1_high"] - y]]
            axis.errorbar(x, y, yerr=error, color=colour, capsize=3, linewidth=1, zorder=2)
        axis.scatter(x, y, color=colour, marker=marker, s=60, zorder=3, label=f"{number}  {row['arm']}")
        # Alternate sides, so the numbers of markers that nearly coincide stay apart.
        axis.annotate(
            str(number),
            (x, y),
            textcoords="offset points",
            xytext=(7, 2) if number % 2 else (-7, 2),
            ha="left" if number % 2 else "right",
            fontsize=9,
            fontweight="bold",
        )
    times = [row["total_seconds_mean"] for row in points]
    if max(times) / min(times) > 20:  # frozen heads take seconds, end-to-end training far longer
        axis.set_xscale("log")
    # At least a few points of headroom: a tight axis would blow 0.5-point gaps up to the full height.
    reach = [
        100 * value
        for row in points
        for value in (row["test_top1_mean"], row["test_top1_low"], row["test_top1_high"])
        if value is not None
    ]
    axis.set_ylim(max(0.0, min(reach) - 5), min(100.0, max(reach) + 5))
    return _finish(figure, axis, "total seconds", "Accuracy against time (colour and marker: method)", dpi)


def learning_curves(records: list[dict], results: dict, dpi: int = 100) -> bytes | None:
    """Loss (left) and top-1 (right) per epoch, train and val, one row per end-to-end arm with a history."""
    from matplotlib.ticker import MaxNLocator

    # One row per arm: its first present run (repeats over seeds would only stack near-copies).
    arms = []
    for record in records:
        run = record.get("run") or record["arm"]
        if (
            record["status"] == "ok"
            and record["method"] in END_TO_END
            and results[run].get("history")
            and record["arm"] not in {label for label, _ in arms}
        ):
            arms.append((record["arm"], run))
    if not arms:
        return None
    figure, axes = _figure(11, 3.2 * len(arms), rows=len(arms), columns=2)
    for row, (_, run) in enumerate(arms):
        history = results[run]["history"]
        epochs = [entry.get("epoch", number + 1) for number, entry in enumerate(history)]
        for column, (quantity, scale) in enumerate((("loss", 1), ("top1", 100))):
            axis = axes[row, column]
            for split, style in (("train", "--"), ("val", "-")):
                # Epochs without a value (val not evaluated that epoch) are left out, not drawn as gaps.
                points = [
                    (epoch, scale * entry[f"{split}_{quantity}"])
                    for epoch, entry in zip(epochs, history, strict=True)
                    if entry.get(f"{split}_{quantity}") is not None
                ]
                if points:
                    axis.plot(
                        [epoch for epoch, _ in points],
                        [value for _, value in points],
                        style,
                        marker=".",
                        label=split,
                    )
            best = results[run].get("best_epoch") or (results[run].get("selected") or {}).get("best_epoch")
            if best:
                axis.axvline(best, color="grey", linestyle=":", label=f"best on val ({best})")
            axis.set_title(f"{run}: {'loss' if quantity == 'loss' else 'top-1 %'}", fontsize=10)
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure, dpi)


def per_class_accuracy(arm: str, accuracy: list, class_names: list, dpi: int = 100) -> bytes | None:
    """Bar per class (sorted, lowest first, named), with the mean per-class accuracy as a dashed line."""
    # Not strict: the caller passes [] for a list the result lacks, and then nothing is drawn.
    pairs = sorted((value, name) for value, name in zip(accuracy, class_names, strict=False) if value is not None)
    if not pairs:
        return None
    figure, axes = _figure(max(8, 0.13 * len(pairs)), 4.5)
    axis = axes[0, 0]
    values = [100 * value for value, _ in pairs]
    axis.bar(range(len(pairs)), values, color="tab:blue", width=0.8)
    axis.axhline(float(numpy.mean(values)), color="black", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(pairs)), [name for _, name in pairs], rotation=90, fontsize=6)
    axis.set_xlim(-0.7, len(pairs) - 0.3)
    axis.set_ylim(0, 100)
    axis.set_ylabel("test accuracy %")
    axis.set_title(f"Per-class test accuracy of {arm}")
    return _png(figure, dpi)


def confusion_matrix(arm: str, matrix: list, class_names: list, dpi: int = 100) -> bytes | None:
    """Image of the confusion matrix, each row divided by its true class's test count."""
    from matplotlib.colors import PowerNorm

    counts = numpy.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.size == 0:
        return None
    rows = counts.sum(axis=1, keepdims=True)
    normalised = numpy.divide(counts, rows, out=numpy.zeros_like(counts), where=rows > 0)
    size = len(counts)
    figure, axes = _figure(9, 8)
    axis = axes[0, 0]
    # A square-root colour scale, so the few-percent confusions stay visible beside a bright diagonal.
    image = axis.imshow(normalised, cmap="viridis", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1), interpolation="nearest")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class (square-root scale)")
    if size <= 30:  # names stay readable up to about 30 classes; beyond that, label numbers
        axis.set_xticks(range(size), class_names, rotation=90, fontsize=7)
        axis.set_yticks(range(size), class_names, fontsize=7)
    else:
        ticks = list(range(0, size, 10))
        axis.set_xticks(ticks, [str(tick) for tick in ticks])
        axis.set_yticks(ticks, [str(tick) for tick in ticks])
    axis.set_xlabel("predicted class (label)")
    axis.set_ylabel("true class (label)")
    axis.set_title(f"Confusion matrix of {arm} (test)")
    return _png(figure, dpi)


def label_efficiency(rows: list[dict], dpi: int = 100) -> bytes | None:
    """Test top-1 against labelled images per class (log x), one line per arm, a band of mean ± sd over seeds."""
    arms: dict = {}
    for row in rows:
        if row["test_top1_mean"] is not None:
            arms.setdefault(row["arm"], []).append(row)
    if not arms:
        return None
    figure, axes = _figure(11, 5)
    axis = axes[0, 0]
    for arm, points in arms.items():
        points = sorted(points, key=lambda row: row["labels_per_class"])
        x = [row["labels_per_class"] for row in points]
        y = numpy.array([100 * row["test_top1_mean"] for row in points])
        sd = numpy.array([100 * (row["test_top1_sd"] or 0.0) for row in points])
        (line,) = axis.plot(x, y, marker=_STYLES[points[0]["method"]][1], label=arm)
        axis.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.2)
    ticks = sorted({row["labels_per_class"] for row in rows})
    axis.set_xscale("log")
    axis.set_xticks(ticks, [str(tick) for tick in ticks])
    axis.minorticks_off()
    return _finish(
        figure, axis, "labelled training images per class", "Label efficiency (band: mean ± sd over seeds)", dpi
    )


def pareto_front(records: list[dict], rows: list[dict], dpi: int = 100) -> bytes | None:
    """Test top-1 against total seconds of every arm and curve point (log x when times differ widely), the
    non-dominated ones ringed and joined; numbers key the labels listed beside the plot."""
    from .report_curves import pareto_front as front_of
    from .report_curves import study_points

    points = study_points(records, rows)
    if not points:
        return None
    front = front_of(points)
    figure, axes = _figure(11, 5)
    axis = axes[0, 0]
    for number, point in enumerate(points, 1):
        colour, marker = _STYLES[point["method"]]
        x, y = point["seconds"], 100 * point["top1"]
        # Curve points smaller and paler than the arms they come from, so the arms stand out.
        size, alpha = (25, 0.55) if point["curve_point"] else (60, 1.0)
        axis.scatter(
            x, y, color=colour, marker=marker, s=size, alpha=alpha, zorder=3, label=f"{number}  {point['label']}"
        )
        axis.annotate(str(number), (x, y), textcoords="offset points", xytext=(6, 2), fontsize=8)
    axis.plot(
        [point["seconds"] for point in front],
        [100 * point["top1"] for point in front],
        color="black",
        linewidth=1,
        drawstyle="steps-post",
        zorder=2,
    )
    axis.scatter(
        [point["seconds"] for point in front],
        [100 * point["top1"] for point in front],
        s=160,
        facecolors="none",
        edgecolors="black",
        zorder=4,
    )
    times = [point["seconds"] for point in points]
    if max(times) / min(times) > 5:  # curve points crowd the fast end on a linear axis
        axis.set_xscale("log")
    title = "Accuracy against time: ringed points form the Pareto front"
    return _finish(figure, axis, "total seconds", title, dpi, legend_title=None, font=7)


def draw_all(study) -> dict[str, bytes]:
    """Every figure the study has data for, by file name (the samples stage's PNGs are copied as they are)."""
    dpi = study.options.dpi
    images: dict[str, bytes] = {}
    if study.samples_directory is not None:
        for name in ("grid.png", "class_distribution.png"):
            path = study.samples_directory / name
            if path.is_file():
                images[name] = path.read_bytes()
    drawn = {
        "accuracy_vs_time.png": accuracy_against_time(study.records, dpi),
        "learning_curves.png": learning_curves(study.records, study.results, dpi),
        "label_efficiency.png": label_efficiency(study.curve_rows, dpi),
        "pareto_front.png": pareto_front(study.records, study.curve_rows, dpi) if study.curve_rows else None,
    }
    if study.best is not None:
        run = study.best.get("run") or study.best["arm"]
        result = study.results[run]
        names = result.get("class_names") or []
        drawn["per_class_accuracy.png"] = per_class_accuracy(run, result.get("per_class_accuracy") or [], names, dpi)
        if names and result.get("confusion_matrix"):
            drawn["confusion_matrix.png"] = confusion_matrix(run, result["confusion_matrix"], names, dpi)
    images.update({name: png for name, png in drawn.items() if png is not None})
    return images
