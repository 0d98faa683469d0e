"""Report content and its two renderings: Markdown (PNG files beside it) and self-contained HTML.

The content is written once as a list of blocks (heading, paragraph, list, table, image, code)
and each renderer turns the same blocks into its format, so the two reports never disagree. The
blocks come from report_format (tables), report_answer (the generated answer and the paired
comparisons) and report_sections (everything after them).
"""

from __future__ import annotations

import base64
import html
import re
import textwrap

from . import cache
from .graph import read_json
from .report_answer import answer, comparison_blocks
from .report_curves import CURVES_IMAGE, PARETO_IMAGE
from .report_curves import section as curves_section
from .report_format import (
    COMPARISON_HEADERS,
    SCORES_HEADERS,
    SETUP_HEADERS,
    SUMMARY_HEADERS,
    Study,
    comparison_rows,
    scores_row,
    setup_row,
    summary_rows,
    text_table,
)
from .report_sections import best_section, environment_section, protocol_section, reference_section

# The report stage's unit and the files it writes there (the stage writes them, `make all` prints them).
UNIT = "study"
MARKDOWN = "report.md"
HTML = "report.html"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
# Per-arm statistics over seeds, one results.summarize row per arm.
SUMMARY_JSON = "summary.json"

# Figures the report may hold, in the order they appear, with their captions.
CAPTIONS = {
    "accuracy_vs_time.png": (
        "Test top-1 against each arm's total seconds (mean over its runs; log scale when times differ widely), "
        "with its 95% bootstrap interval; numbers key the arms listed beside the plot."
    ),
    CURVES_IMAGE: (
        "Test top-1 against labelled training images per class (log scale), one line per arm: the mean over "
        "seeds, the band spanning mean ± sd."
    ),
    PARETO_IMAGE: (
        "Test top-1 against total seconds of every arm (large markers) and every curve point below the full "
        "train split (small, pale; log scale when times differ widely); ringed points joined by the line are "
        "the non-dominated ones (the Pareto front)."
    ),
    "grid.png": "Random training images with their class names (from the samples stage).",
    "class_distribution.png": "Images per class in each split, one panel per split (from the samples stage).",
    "learning_curves.png": "Per-epoch loss and top-1 of every end-to-end arm (train and val; test never looked at).",
    "per_class_accuracy.png": "Test accuracy per class of the best arm, sorted; dashed line: mean per-class accuracy.",
    "confusion_matrix.png": "Test confusion matrix of the best arm, each row normalised by its true class's size.",
}


def content(study: Study, images: dict) -> list:
    """Every block of the report, in order (shared by both renderers)."""
    records = study.records
    missing = [r for r in records if r["status"] != "ok"]
    blocks = [
        ("h1", study.title),
        ("p", answer(records)),
        (
            "p",
            (
                f"{len(records) - len(missing)} of {len(records)} runs present. Built only from each arm's "
                "result.json, predictions and manifest.json; this report never trains. Percentages are of the "
                "test or val split; times are wall-clock seconds on the device shown."
            ),
        ),
        ("h2", "Comparison"),
        ("table", COMPARISON_HEADERS, comparison_rows(records)),
    ]
    if missing:
        blocks += [
            ("p", "Missing arms (not run, or their outputs are no longer valid):"),
            ("ul", [f"{r['arm']}: {r['missing_reason']}" for r in missing]),
        ]
    if study.unpaired:
        blocks += [
            ("p", "Runs without per-image test predictions (no interval or paired comparison; rebuild them):"),
            ("ul", [f"{run}: {reason}" for run, reason in study.unpaired.items()]),
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
    blocks += comparison_blocks(records)
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
    blocks += [
        ("h2", "Details of every run"),
        ("table", SETUP_HEADERS, [setup_row(r) for r in records]),
        ("table", SCORES_HEADERS, [scores_row(r) for r in records]),
        ("h2", "Accuracy against time"),
    ]
    blocks += [("img", "accuracy_vs_time.png")] if "accuracy_vs_time.png" in images else [("p", "No arm present.")]
    blocks += curves_section(study, images)
    blocks += reference_section(study)
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
    return blocks + best_section(study, images) + protocol_section(study) + environment_section(study)


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
    """A number, or a number followed by its interval (`71.23 [70.10, 72.35]`): right-aligned cells."""
    try:
        float(str(text).split(" [")[0].replace(",", ""))
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


def summary(graph) -> str:
    """The comparison table, the generated answer and the report's path (what `make all` prints at the end)."""
    directory = graph.directory(graph.unit("report", UNIT))
    records = read_json(cache.require_intact(directory / RESULTS_JSON))
    return (
        text_table(records)
        + "\n\n"
        + textwrap.fill(answer(records), width=110)
        + f"\nreport: {directory / HTML}\n        {directory / MARKDOWN}"
    )
