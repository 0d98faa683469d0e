"""The report's sections after the comparison: the best arm (figures, most-confused pairs, lowest
classes), published references, the protocol, the environment and the resolved config."""

from __future__ import annotations

import json

import numpy

from . import results
from .head_kinds import deterministic_kinds
from .report_answer import intervals_note
from .report_format import Study, percent, plain

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


def best_section(study: Study, images: dict) -> list:
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


def reference_section(study: Study) -> list:
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


def protocol_section(study: Study) -> list:
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
        intervals_note(),
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
        return "Each arm ran once with the seed shown; no repeats measure how much the seed moves its numbers."
    return (
        f"Each arm ran {runs} times, one per seed (seeds control data order, augmentation and head or model "
        "initialisation); the across-seeds table gives the mean ± sample standard deviation (n - 1). "
        "Frozen arms of one backbone share a single feature extraction (its augmented views drawn with the "
        "first seed), so their spread covers head initialisation and data order only"
        + deterministic_note([r.get("head") for r in records if r.get("method") == results.FROZEN])
        + ". Even with one seed, GPU kernels and thread scheduling can change the last digits between runs."
    )


def deterministic_note(heads: list) -> str:
    """', and the <kinds> heads are deterministic ...' for the deterministic kinds among `heads`, or ''."""
    kinds = deterministic_kinds(heads)
    if not kinds:
        return ""
    named = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    return (
        f", and the {named} head{'s are' if len(kinds) > 1 else ' is'} deterministic: nothing in "
        f"{'their' if len(kinds) > 1 else 'its'} fit depends on the seed, so on the same rows "
        f"{'their' if len(kinds) > 1 else 'its'} spread is 0"
    )


def environment_section(study: Study) -> list:
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
