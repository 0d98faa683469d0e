"""Report content and its two renderings: Markdown (PNG files beside it) and self-contained HTML.

The content is written once as a list of blocks (heading, paragraph, list, table, image, code)
and each renderer turns the same blocks into its format, so the two reports never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy

from .config import ReportConfig
from .results import summarize

# Figures the report may hold, in the order they appear, with their captions.
CAPTIONS = {
    "accuracy_vs_time.png": "Test top-1 against each arm's total seconds (log scale when times differ widely).",
    "grid.png": "Random training images with their class names (from the samples stage).",
    "class_distribution.png": "Images per class and split (from the samples stage).",
    "learning_curves.png": "Per-epoch loss and top-1 of every end-to-end arm (train and val; test never looked at).",
    "per_class_accuracy.png": "Test accuracy per class of the best arm, sorted; dashed line: mean per-class accuracy.",
    "confusion_matrix.png": "Test confusion matrix of the best arm, each row normalised by its true class's size.",
}
# The notebook this study revisits: its reported numbers, not re-measured here.
NOTEBOOK_REFERENCE = [
    ("CNN from scratch", 0.35),
    ("Frozen ResNet-18", 0.79),
    ("Fine-tuned ResNet-18", 0.89),
    ("EfficientNet-B5", 0.82),
]
NOTEBOOK_FLAWS = [
    (
        "Its EfficientNet-B5 head was set on `.fc`, an attribute that model never calls, so the live 1000-way "
        "ImageNet `_fc` stayed and the 102-class layer went unused."
    ),
    (
        "It did not follow this study's protocol (official train/val/test splits, every choice made on val, "
        "test held out until the end), so its numbers are not comparable to ours one for one."
    ),
]
# Published results on the full-resolution images, all 6,149 test images.
PUBLISHED_TARGETS = [
    ("ResNet-50 linear probe", "frozen", 0.947),
    ("ResNet-50 fine-tuned", "finetune", 0.976),
    ("EfficientNet-B5 fine-tuned", "finetune", 0.985),
]
COMPARISON_HEADERS = [
    "Arm",
    "Method",
    "Backbone",
    "Head",
    "Input px",
    "Train images",
    "Fit on",
    "Val top-1 %",
    "Test top-1 %",
    "Test mean per-class %",
    "Extract s",
    "Train s",
    "Eval s",
    "Total s",
    "Images/s",
    "Device",
    "Seed",
    "Status",
]
MISSING = "n/a"


@dataclass
class Study:
    """Everything the report shows, read from results and manifests only."""

    title: str
    records: list  # results.json records, one per expected run (arm x seed)
    results: dict  # run -> its full result.json (present runs only)
    manifests: dict  # run -> its manifest.json
    best: dict | None  # record of the arm with the best val top-1
    samples_directory: Path | None
    samples_missing: str | None
    options: ReportConfig | None = None


def percent(value) -> str:
    """A 0-1 fraction as a percentage with two decimals (n/a when absent)."""
    return MISSING if value is None else f"{100 * value:.2f}"


def seconds(value) -> str:
    """Seconds (or images per second) with one decimal (n/a when absent)."""
    return MISSING if value is None else f"{value:.1f}"


def plain(value) -> str:
    """Any other value as text (n/a when absent)."""
    return MISSING if value is None else str(value)


def comparison_row(record: dict) -> list[str]:
    """One table row; fixed decimals (percent 2, seconds 1) so each cell maps back to the exact input."""
    return [
        record.get("run") or record["arm"],
        record["method"],
        plain(record["backbone"]),
        plain(record["head"]),
        plain(record["input_size"]),
        plain(record["train_images"]),
        plain(record["fit_on"]),
        percent(record["val_top1"]),
        percent(record["test_top1"]),
        percent(record["test_mean_per_class"]),
        seconds(record["extract_seconds"]),
        seconds(record["train_seconds"]),
        seconds(record["eval_seconds"]),
        seconds(record["total_seconds"]),
        seconds(record["images_per_second"]),
        plain(record["device"]),
        plain(record["seed"]),
        record["status"],
    ]


def text_table(records: list[dict]) -> str:
    """The comparison table for a terminal: fixed-width columns, missing arms marked with their reason."""
    headers = [
        "arm",
        "val top-1 %",
        "test top-1 %",
        "mean/class %",
        "extract s",
        "train s",
        "eval s",
        "total s",
        "images/s",
    ]
    rows = [
        [
            r.get("run") or r["arm"],
            percent(r["val_top1"]),
            percent(r["test_top1"]),
            percent(r["test_mean_per_class"]),
            seconds(r["extract_seconds"]),
            seconds(r["train_seconds"]),
            seconds(r["eval_seconds"]),
            seconds(r["total_seconds"]),
            seconds(r["images_per_second"]),
        ]
        for r in records
    ]
    lines = _aligned(headers, rows)
    lines += [f"missing: {r.get('run') or r['arm']}: {r['missing_reason']}" for r in records if r["status"] != "ok"]
    lines += [
        f"unverified weights: {r.get('run') or r['arm']} (its weights file is not the published one)"
        for r in records
        if r.get("weights_verified") == "no"
    ]
    summary = summary_rows(records)
    if summary:
        lines += ["", "across seeds (mean ± sd):", *_aligned(SUMMARY_HEADERS, summary)]
    return "\n".join(lines)


def _aligned(headers: list, rows: list) -> list[str]:
    """Fixed-width lines: first column left-aligned, the others right-aligned, a rule under the headers."""
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]

    def line(cells: list) -> str:
        return "  ".join(
            str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(headers), "  ".join("-" * width for width in widths), *map(line, rows)]


SUMMARY_HEADERS = ["Arm", "Runs", "Seeds", "Val top-1 %", "Test top-1 %", "Test mean per-class %", "Train s", "Total s"]


def spread(mean, sd, scale: float, decimals: int) -> str:
    """`mean ± sd` (sd left out for a single run, n/a when absent)."""
    if mean is None:
        return MISSING
    text = f"{scale * mean:.{decimals}f}"
    return text if sd is None else f"{text} ± {scale * sd:.{decimals}f}"


def summary_rows(records: list[dict]) -> list[list[str]]:
    """The across-seeds table, or [] when every arm ran once (then the comparison table says it all)."""
    rows = summarize(records)
    if all(row["expected_runs"] < 2 for row in rows):
        return []
    return [
        [
            row["arm"],
            f"{row['runs']} of {row['expected_runs']}",
            ", ".join(map(str, row["seeds"])) or MISSING,
            spread(row["val_top1_mean"], row["val_top1_sd"], 100, 2),
            spread(row["test_top1_mean"], row["test_top1_sd"], 100, 2),
            spread(row["test_mean_per_class_mean"], row["test_mean_per_class_sd"], 100, 2),
            spread(row["train_seconds_mean"], row["train_seconds_sd"], 1, 1),
            spread(row["total_seconds_mean"], row["total_seconds_sd"], 1, 1),
        ]
        for row in rows
    ]


def confused_pairs(matrix, class_names: list, count: int) -> list[tuple]:
    """The `count` unordered class pairs with the most test errors between them, both directions summed."""
    matrix = numpy.asarray(matrix)
    pairs = []
    for first in range(len(matrix)):
        for second in range(first + 1, len(matrix)):
            both = int(matrix[first, second] + matrix[second, first])
            if both:
                pairs.append(
                    (
                        both,
                        class_names[first],
                        class_names[second],
                        int(matrix[first, second]),
                        int(matrix[second, first]),
                    )
                )
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    return pairs[:count]


def _best_section(study: Study, images: dict) -> list:
    best = study.best
    if best is None:
        return [("h2", "Best arm"), ("p", "No arm has results yet, so there is no best arm.")]
    result = study.results[best.get("run") or best["arm"]]
    repeats = sum(record["arm"] == best["arm"] for record in study.records) > 1
    shown = f" (figures and tables below: its run {best.get('run')}, seed {best['seed']})" if repeats else ""
    blocks = [
        ("h2", f"Best arm: {best['arm']}"),
        (
            "p",
            (
                f"Chosen by validation top-1 ({'mean over seeds; ' if repeats else ''}this run "
                f"{percent(best['val_top1'])} %), not by test, so the choice does not peek at the test set"
                f"{shown}. Its test top-1 is {percent(best['test_top1'])} % and its mean "
                f"per-class accuracy {percent(best['test_mean_per_class'])} %."
            ),
        ),
    ]
    blocks += [("img", name) for name in ("per_class_accuracy.png", "confusion_matrix.png") if name in images]
    names = result.get("class_names") or []
    matrix = result.get("confusion_matrix")
    if matrix and names:
        pairs = confused_pairs(matrix, names, study.options.confused_pairs)
        blocks += [
            ("h3", f"The {len(pairs)} most-confused class pairs (test)"),
            (
                "table",
                ["Class A", "Class B", "Errors between them", "A taken for B", "B taken for A"],
                [[a, b, str(both), str(ab), str(ba)] for both, a, b, ab, ba in pairs],
            ),
        ]
    accuracy = result.get("per_class_accuracy") or []
    # Not strict: either list is [] when the result lacks it, and then the table is left out.
    ranked = sorted((value, name) for value, name in zip(accuracy, names, strict=False) if value is not None)
    if ranked:
        lowest = ranked[: study.options.lowest_classes]
        blocks += [
            ("h3", f"The {len(lowest)} lowest-accuracy classes (test)"),
            ("table", ["Class", "Test accuracy %"], [[name, percent(value)] for value, name in lowest]),
        ]
    return blocks


def _reference_section(study: Study) -> list:
    if study.options is not None and not study.options.flowers_references:
        return []
    present = [record for record in study.records if record["status"] == "ok" and record["test_top1"] is not None]
    gaps = []
    for name, method, target in PUBLISHED_TARGETS:
        ours = max((r for r in present if r["method"] == method), key=lambda r: r["test_top1"], default=None)
        if ours is not None:
            gap = 100 * (target - ours["test_top1"])
            verdict = f"{gap:.2f} points below" if gap > 0 else f"{-gap:.2f} points above"
            gaps.append([name, f"{100 * target:.1f}", ours["arm"], percent(ours["test_top1"]), verdict])
    blocks = [
        ("h2", "References (not our measurements)"),
        ("p", "The notebook's reported test accuracies, for orientation only; they were not re-measured here."),
        (
            "table",
            ["Notebook arm", "Reported test accuracy %"],
            [[name, f"{100 * value:.0f}"] for name, value in NOTEBOOK_REFERENCE],
        ),
        ("ul", NOTEBOOK_FLAWS),
        ("p", "Published targets on full-resolution Flowers-102, measured on all 6,149 test images:"),
        (
            "table",
            ["Published result", "Test top-1 %"],
            [[name, f"{100 * value:.1f}"] for name, _, value in PUBLISHED_TARGETS],
        ),
    ]
    if gaps:
        blocks += [
            (
                "p",
                (
                    "Our best arm of the same method against each target. Backbones and image resolution "
                    "may differ from the published setting (see Protocol), so a gap is a fact, not a verdict "
                    "on the method:"
                ),
            ),
            ("table", ["Target", "Target %", "Our best arm of that method", "Ours %", "Gap"], gaps),
        ]
    return blocks


def _protocol_section(study: Study) -> list:
    sizes, split_note = None, "official splits"
    if study.samples_directory is not None and (study.samples_directory / "sizes.json").is_file():
        written = json.loads((study.samples_directory / "sizes.json").read_text())
        recorded, split_note = written["splits"], written.get("split_note", "official splits")
        sizes = {split: recorded[split] for split in ("train", "val", "test") if split in recorded}
    present = [r for r in study.records if r["status"] == "ok"]
    split_text = (
        ", ".join(f"{split} {count:,}" for split, count in sizes.items()) + f" images ({split_note})"
        if sizes
        else f"unknown: samples stage missing ({study.samples_missing})"
    )
    by_size: dict = {}
    for record in present:
        if record["arm"] not in by_size.get(plain(record["input_size"]), []):
            by_size.setdefault(plain(record["input_size"]), []).append(record["arm"])
    frozen = [r for r in present if r["method"] == "frozen"]
    fits = sorted({plain(r["fit_on"]) for r in frozen})
    items = [
        f"Splits: {split_text}.",
        (
            "Every hyper-parameter and epoch choice was made on val only (each arm's choices are listed below); "
            "the test split was held out and evaluated once per arm, after selection."
        ),
        "Input sizes: "
        + (
            "; ".join(f"{size} px: {', '.join(arms)}" for size, arms in by_size.items())
            if by_size
            else "no arm present"
        )
        + ".",
        (
            "Frozen arms reuse the cached features of their backbone, so their time is feature extraction + "
            "head training + evaluation; the extraction is shared by the heads of one backbone and counted "
            "in each of them. End-to-end arms have no extraction time. Total s is the arm's own total: it may "
            "exceed extract + train + eval by data preparation (e.g. decoding images once into a cache)."
        ),
        "Frozen heads were fit on: "
        + (", ".join(fits) if fits else "no frozen arm present")
        + " (train+val means the final fit also used val, with the hyper-parameters chosen on val).",
        _seeds_note(study.records),
    ]
    selected = [[r.get("run") or r["arm"], json.dumps(r["selected"], sort_keys=True)] for r in present]
    return [
        ("h2", "Protocol"),
        ("ul", items),
        ("h3", "Hyper-parameters selected on val"),
        ("table", ["Arm", "Selected"], selected) if selected else ("p", "No arm present."),
    ]


def _seeds_note(records: list[dict]) -> str:
    runs = max((sum(r["arm"] == arm for r in records) for arm in {r["arm"] for r in records}), default=1)
    if runs < 2:
        return "Each arm ran once with the seed shown; with no repeats, differences of about a point may be noise."
    return (
        f"Each arm ran {runs} times, one per seed (seeds control data order, augmentation and head or model "
        "initialisation); the across-seeds table gives the mean ± sample standard deviation (n - 1). "
        "Frozen arms of one backbone share a single feature extraction (its augmented views drawn with the "
        "first seed), so their spread covers head initialisation and data order only, and the logistic "
        "head's solver is deterministic (its spread is about 0). Even with one seed, GPU kernels and "
        "thread scheduling can change the last digits between runs."
    )


def _environment_section(study: Study) -> list:
    keys = ["python", "torch", "device", "device_name", "precision", "torch_threads", "cpu_count", "platform"]
    rows = []
    for run, manifest in study.manifests.items():
        # A stage that left device or precision out of its manifest still records them in its result.
        recorded = {
            **{key: study.results[run].get(key) for key in ("device", "precision")},
            **{key: value for key, value in manifest.get("environment", {}).items() if value is not None},
        }
        rows.append([run, *(plain(recorded.get(key)) for key in keys), plain(manifest.get("created"))])
    blocks = [
        ("h2", "Environment"),
        ("table", ["Arm", *keys, "built"], rows) if rows else ("p", "No arm present."),
        ("h2", "Configuration"),
    ]
    groups: dict = {}
    for arm, manifest in study.manifests.items():
        text = json.dumps(manifest.get("config", {}), indent=2, sort_keys=True)
        groups.setdefault(text, []).append((arm, manifest.get("config_source")))
    if not groups:
        blocks.append(("p", "No arm present, so no resolved config to show."))
    for text, arms in groups.items():
        sources = sorted({plain(source) for _, source in arms})
        blocks += [
            (
                "p",
                (
                    f"Resolved config (from the manifests) of {', '.join(arm for arm, _ in arms)}; "
                    f"config file: {', '.join(sources)}."
                ),
            ),
            ("code", text),
        ]
    return blocks


def content(study: Study, images: dict) -> list:
    """Every block of the report, in order (shared by both renderers)."""
    records = study.records
    missing = [r for r in records if r["status"] != "ok"]
    blocks = [
        ("h1", study.title),
        (
            "p",
            (
                f"{len(records) - len(missing)} of {len(records)} arms present. Built only from each arm's "
                "result.json and manifest.json; this report never trains. Percentages are of the test or val "
                "split; times are wall-clock seconds on the device shown."
            ),
        ),
        ("h2", "Comparison"),
        ("table", COMPARISON_HEADERS, [comparison_row(r) for r in records]),
    ]
    summary = summary_rows(records)
    if summary:
        blocks += [
            ("h2", "Across seeds"),
            (
                "p",
                (
                    "Mean ± sample standard deviation over each arm's runs (one per seed); `Runs` counts the "
                    "runs present of those the config asks for."
                ),
            ),
            ("table", SUMMARY_HEADERS, summary),
        ]
    if missing:
        blocks += [
            ("p", "Missing arms (not run, or their outputs are no longer valid):"),
            ("ul", [f"{r['arm']}: {r['missing_reason']}" for r in missing]),
        ]
    unverified = sorted({r["arm"] for r in records if r.get("weights_verified") == "no"})
    if unverified:
        blocks.append(
            (
                "p",
                "Unverified weights: " + ", ".join(unverified) + " used a weights file whose sha256 "
                "is not the published one (a re-saved, fine-tuned or tampered copy); their numbers are "
                "not those of the published pretrained network.",
            )
        )
    if study.best is not None:
        blocks.append(("p", f"Best arm by val top-1: {study.best['arm']}."))
    blocks += [("h2", "Accuracy against time")]
    blocks += [("img", "accuracy_vs_time.png")] if "accuracy_vs_time.png" in images else [("p", "No arm present.")]
    blocks += _reference_section(study)
    blocks += [("h2", "Data")]
    if study.samples_missing is not None:
        blocks.append(("p", f"Sample grid and class distribution missing: {study.samples_missing}."))
    blocks += [("img", name) for name in ("grid.png", "class_distribution.png") if name in images]
    blocks += [("h2", "Learning curves")]
    blocks += (
        [("img", "learning_curves.png")]
        if "learning_curves.png" in images
        else [("p", "No end-to-end arm with a per-epoch history is present.")]
    )
    return blocks + _best_section(study, images) + _protocol_section(study) + _environment_section(study)


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(study: Study, images: dict) -> str:
    """Markdown with tables and links to the PNG files written beside it."""
    out = []
    for block in content(study, images):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(_markdown_cell, headers)) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{CAPTIONS[block[1]]}]({block[1]})\n\n*{CAPTIONS[block[1]]}*")
        elif kind == "code":
            out.append(f"```json\n{block[1]}\n```")
    return "\n\n".join(out) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .5em}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.missing td{color:#a00}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-style:italic;color:#555}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}.scroll{overflow-x:auto}
td:first-child{white-space:nowrap}code{background:#f0f0f0;padding:0 .2em}"""


def _is_number(text: str) -> bool:
    try:
        float(str(text).replace(",", ""))
        return True
    except ValueError:
        return False


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans turned into <code> (the only inline markup used)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(study: Study, images: dict) -> str:
    """One self-contained HTML page: inline CSS, every figure embedded as a base64 PNG, no scripts."""
    escape = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(study.title)}</title><style>{STYLE}</style></head><body>",
    ]
    for block in content(study, images):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = [
                '<div class="scroll"><table>',
                "<tr>" + "".join(f"<th>{escape(str(cell))}</th>" for cell in headers) + "</tr>",
            ]
            for row in rows:
                marker = ' class="missing"' if row[-1] == "missing" else ""
                cells = "".join(
                    f'<td class="n">{escape(str(cell))}</td>' if _is_number(cell) else f"<td>{escape(str(cell))}</td>"
                    for cell in row
                )
                lines.append(f"<tr{marker}>{cells}</tr>")
            out.append("\n".join(lines) + "</table></div>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            caption = escape(CAPTIONS[block[1]])
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        elif kind == "code":
            out.append(f"<details><summary>resolved config (JSON)</summary><pre>{escape(block[1])}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
