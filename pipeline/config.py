"""Typed study configuration: one TOML file -> frozen dataclasses, validated before any work starts.

Every field carries a one-line doc (shown by `python -m stages.config --docs`, mirrored in
docs/configuration.md) and optional constraints. Unknown sections or keys, wrong types and impossible values are
rejected with a one-line `ConfigError` that names the key and the valid choices (the checks themselves are in
pipeline/settings.py). A section may hold sub-tables: [heads] holds one per registered head kind.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from . import head_kinds
from .head_kinds.linear import NORMALIZATIONS
from .settings import TABLES, ConfigError, build_section, choices_of, setting, tables_field_of
from .training_settings import AUGMENTATIONS, CnnConfig, FinetuneConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ENGINES = ("auto", "torch", "onnxruntime")
# pipeline.datasets reads each kind (tests check that list against its readers).
DATASET_KINDS = ("flowers102", "folder", "oxford_iiit_pet", "dtd", "fgvc_aircraft")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = setting("auto", "Compute device: auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps.")
    threads: int = setting(0, "CPU threads for torch; 0 keeps torch's default (all cores).", minimum=0)
    num_workers: int = setting(
        2,
        "DataLoader worker processes (extraction with one stream, the notebook baselines); "
        "0 decodes inline, which suits small images on few cores.",
        minimum=0,
    )
    inference_streams: int = setting(
        0,
        "Extraction batches in flight at once, each in its own thread with its share "
        "of the torch threads, decoding its own images; 0 = one per torch thread on "
        "CPU (at most 4), 1 on GPUs. Features are bit-identical either way.",
        minimum=0,
    )
    precision: str = setting(
        "auto",
        "auto = on CUDA bf16 autocast where supported, else fp16; on CPU bf16 or fp32, whichever runs "
        "each backbone's stage faster here, measured once per machine and stored "
        "(<cache root>/calibration/); fp32 on other devices.",
        choices=PRECISIONS,
    )
    engine: str = setting(
        "auto",
        "What runs the frozen backbones' forward pass (extraction, predict): auto = on CPU torch or "
        "onnxruntime (fp32), whichever runs each backbone faster here, measured with the precision and "
        "stored; torch elsewhere. onnxruntime needs the [onnx] extra and a CPU. Training is always torch.",
        choices=ENGINES,
    )
    channels_last: bool = setting(True, "Use channels_last memory format for convolutional models.")
    float32_depthwise: bool = setting(
        True,
        "On CPU in bf16, train depthwise convolutions in fp32 (their bf16 weight "
        "gradients are several times slower there); inference stays bf16.",
    )
    keep_freed_memory: bool = setting(
        True,
        "Linux (glibc): keep freed memory in the process for reuse instead of "
        "returning it to the kernel, so batches stop page-faulting their "
        "activations back in; no effect on the numbers. Turn off if resident "
        "memory must fall again after the peak.",
    )
    seed: int = setting(0, "Seed for data order, augmentation, initialisation and sampling.", minimum=0)
    seeds: int = setting(
        1,
        "Runs of every trained arm, with seeds seed, seed+1, ...; the report adds mean ± sd when > 1 (SEEDS=).",
        minimum=1,
    )


@dataclass(frozen=True)
class CacheConfig:
    root: str = setting("cache", "Folder that holds every artifact (relative paths are taken from the project root).")
    lock_timeout_seconds: float = setting(
        3600.0, "How long a stage waits for another run holding its lock before giving up.", minimum=0
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = setting("flowers102", "Which data (docs/configuration.md#datasets).", choices=DATASET_KINDS)
    root: str = setting("cache/data", "Folder holding the data (e.g. flowers-102/); DATA_DIR= overrides it.")
    download: bool = setting(True, "Download the dataset into root when it is missing (needs internet; not folder).")
    check_md5: bool = setting(True, "Require the official md5 of imagelabels.mat and setid.mat (flowers102).")
    num_classes: int = setting(102, "Number of classes; 0 takes it from the data (not flowers102).", minimum=0)
    expected_images: int = setting(8189, "Images expected (flowers102: in jpg/); 0 skips the check.", minimum=0)
    expected_split_sizes: list = setting([1020, 1020, 6149], "Expected train, val, test sizes; a 0 is not checked.")
    val_fraction: float = setting(
        0.1, "Data without val: the share of each train class carved into val.", minimum=0.01, maximum=0.9
    )
    split_seed: int = setting(0, "Seed of that stratified carve.", minimum=0)
    check_images: bool = setting(True, "Decode every image once when verifying (finds corrupt or truncated JPEGs).")
    skip_bad_images: bool = setting(False, "Drop unreadable images with a warning listing them, instead of stopping.")


@dataclass(frozen=True)
class SamplesConfig:
    rows: int = setting(4, "Rows in the sample grid.", minimum=1, maximum=20)
    columns: int = setting(6, "Columns in the sample grid.", minimum=1, maximum=20)
    tile_pixels: int = setting(160, "Size each sample is drawn at in the grid.", minimum=16)


@dataclass(frozen=True)
class FeaturesConfig:
    backbones: list = setting(["resnet18", "efficientnet-b5"], "Frozen backbones whose features are cached.")
    input_size: int = setting(0, "Input crop in pixels; 0 uses each backbone's native size.", minimum=0)
    batch_size: int = setting(64, "Images per extraction batch.", minimum=1)
    augmented_views: int = setting(
        0, "Extra augmented (crop/flip) views of each training image cached as rows.", minimum=0, maximum=64
    )
    view_augmentation: str = setting(
        "crop-flip", "How augmented views are drawn (augmented_views > 0).", choices=AUGMENTATIONS[1:]
    )
    view_minimum_scale: float = setting(
        0.35, "Smallest crop area (fraction of the image) of an augmented view.", minimum=0.05, maximum=1
    )
    fold_batchnorm: bool = setting(
        True,
        "Fold each BatchNorm into the convolution before it (and move equal-sided "
        "padding inside the convolutions) for extraction: the same function with "
        "fewer passes over the activations. bf16 rounding moves, so it is part of "
        "the features key; turn off to extract with the network as published.",
    )


@dataclass(frozen=True)
class HeadsConfig:
    """The shared [heads] keys; each kind's own settings are its [heads.<kind>] table (pipeline/head_kinds)."""

    kinds: list = setting(
        ["softmax", "logistic", "knn"],
        "Heads trained on each backbone's cached features, one arm each; a kind's own settings are its "
        "[heads.<kind>] table.",
        choices=head_kinds.available_head_kinds,
    )
    fit_on: str = setting(
        "train",
        "Final fit on train only, or on train+val with the hyper-parameters chosen on val.",
        choices=("train", "train+val"),
    )
    normalizations: list = setting(
        ["none"],
        "Feature normalisations tried on val by every kind (statistics from the fit rows only).",
        choices=NORMALIZATIONS,
    )
    use_augmented_views: bool = setting(
        True, "Also fit on the cached augmented training views, when the features have them."
    )
    tables: dict = field(default_factory=head_kinds.default_tables, metadata={TABLES: head_kinds.settings_tables})

    def table(self, kind: str) -> Any:
        """The [heads.<kind>] settings of a registered kind."""
        return self.tables[kind]


# What one curve worker may hold at its peak: 1.0 GB was measured (torch, scikit-learn and Lite2's features
# of the 8,189 Flowers-102 images, k-NN scoring the test split), with room for larger feature files.
WORKER_MEMORY_BYTES = 3 * 2**29


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The memory the kernel says new processes can take without swapping (Linux); None where it does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class CurvesConfig:
    """Label-efficiency curves: every trained arm refitted on n labelled training images per class."""

    labels_per_class: list = setting(
        [1, 2, 5, 10],
        "Labelled training images per class of each curve point; subsets are drawn from train only, nested, "
        "stratified and seeded. A number at or above a class's train count takes all of that class.",
    )
    seeds: int = setting(
        3,
        "Subset draws per point (seeds runtime.seed, runtime.seed + 1, ...); each seed draws its own nested "
        "subsets and also seeds the head, so the band shows both sources of spread.",
        minimum=1,
    )
    end_to_end: bool = setting(
        False,
        "Also run the end-to-end arms (finetune, cnn) on the subsets, each with its own recipe (hours on a "
        "CPU at full size; in one process).",
    )
    workers: int = setting(
        0,
        "Processes that build the frozen curve points side by side, each on one torch thread; 0 = one per "
        "CPU core this process may use, fewer if the available memory holds fewer at 1.5 GiB each; 1 = one "
        "after another in this process. Changes no output, so it "
        "is in no cache key (end-to-end points and torchrun runs stay in one process).",
        minimum=0,
    )

    def worker_count(self) -> int:
        """`workers` resolved: 0 becomes the CPU cores this process may run on, as many as the memory
        available now holds at WORKER_MEMORY_BYTES each (at least one)."""
        if self.workers:
            return self.workers
        # The affinity mask, not the machine's count: a pinned or containerised run gets only its own cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        available = available_memory_bytes()
        return cores if available is None else max(1, min(cores, available // WORKER_MEMORY_BYTES))

    def __post_init__(self):
        points = self.labels_per_class
        if not points or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in points):
            raise ConfigError(f"[curves] labels_per_class must list positive whole numbers, got {points!r}")
        if len(set(points)) != len(points):
            raise ConfigError(f"[curves] labels_per_class lists a number twice: {points!r}")


@dataclass(frozen=True)
class ReportConfig:
    title: str = setting("Flowers-102: scratch vs frozen extractor vs fine-tuning", "Report title.")
    confused_pairs: int = setting(10, "Most-confused class pairs of the best arm listed by name.", minimum=0)
    lowest_classes: int = setting(10, "Lowest-accuracy classes of the best arm listed by name.", minimum=0)
    dpi: int = setting(100, "Resolution of the report's figures (dots per inch).", minimum=30, maximum=300)
    flowers_references: bool = setting(
        True,
        "Show the notebook's and the published Flowers-102 accuracies and our "
        "gap to each; false for other data (the demo).",
    )


@dataclass(frozen=True)
class Config:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    data: DataConfig = field(default_factory=DataConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cnn: CnnConfig = field(default_factory=CnnConfig)
    curves: CurvesConfig = field(default_factory=CurvesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Explicit weight files per backbone name (checked before any cache or download).
    weights: dict = field(default_factory=dict)
    # Where the file came from, for messages and manifests; not part of any cache key.
    source: str = field(default="<defaults>", compare=False)

    def section(self, name: str) -> dict:
        """One section as a plain dict (what a stage hashes into its cache key); sub-tables sit beside the
        section's keys, as the TOML file writes them."""
        value = getattr(self, name)
        if isinstance(value, dict):
            return dict(value)
        data = dataclasses.asdict(value)
        tables_field = tables_field_of(type(value))
        if tables_field:
            data.update(data.pop(tables_field.name))
        return data

    def run_seeds(self) -> list[int]:
        """The seed of each repeat of a trained arm: seed, seed + 1, ... (runtime.seeds of them)."""
        return [self.runtime.seed + index for index in range(self.runtime.seeds)]

    def with_seed(self, seed: int) -> Config:
        """This config for one repeat (what a per-seed unit is planned and built with)."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, seed=seed))

    def seeded_name(self, name: str, seed: int) -> str:
        """A per-seed unit's name: the plain name for the first seed (so its cache is shared with
        single-seed runs), `<name>-seed<N>` for the repeats."""
        return name if seed == self.runtime.seed else f"{name}-seed{seed}"

    def to_dict(self) -> dict:
        """The whole resolved config as plain data (saved beside every stage output)."""
        return {name: self.section(name) for name in section_names()}


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "source"]


def section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {name: hints[name] for name in section_names()}


def _cross_check(config: Config) -> None:
    split_sizes, flowers = config.data.expected_split_sizes, config.data.dataset == "flowers102"
    if len(split_sizes) != 3 or any(not isinstance(size, int) or size < flowers for size in split_sizes):
        raise ConfigError(
            f"[data] expected_split_sizes must be three {'positive' if flowers else 'non-negative'} integers "
            f"(train, val, test), got {split_sizes!r}"
        )
    if config.data.num_classes == 1 or (flowers and 0 in (config.data.num_classes, config.data.expected_images)):
        raise ConfigError("[data] num_classes must be >= 2 and expected_images > 0 (0, from the data: not flowers102)")
    if not config.heads.kinds:
        raise ConfigError(f"[heads] kinds must name at least one of: {', '.join(head_kinds.available_head_kinds())}")
    if not config.cnn.widths or any(width < 1 for width in config.cnn.widths):
        raise ConfigError(f"[cnn] widths must be positive integers, got {config.cnn.widths!r}")
    for section in ("features", "finetune"):
        names = getattr(config, section).backbones
        if len(set(names)) != len(names):
            raise ConfigError(f"[{section}] backbones lists a name twice: {names!r}")
    for name, path in config.weights.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"[weights] {name} must be a file path string, got {path!r}")


def _parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` (value in TOML syntax, or a bare string) -> (section, key, value).

    The key of a sub-table's setting keeps its dots: `heads.softmax.lr=0.01` -> ("heads", "softmax.lr", 0.01).
    """
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. finetune.epochs=5")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    key = key.strip('"')  # weights."torchvision:resnet50"=... quotes the key as a TOML file must
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate plain data (as read from TOML) into a Config."""
    sections = section_types()
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] in {source}; known sections: {', '.join(sections)}")
        if name == "weights":
            if not isinstance(values, dict):
                raise ConfigError("[weights] must map backbone names to weight file paths")
            built[name] = dict(values)
        else:
            built[name] = build_section(name, sections[name], values)
    config = Config(**built, source=source)
    _cross_check(config)
    return config


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple = (),
    data_dir: str | None = None,
    device: str | None = None,
) -> Config:
    """Read a TOML config, apply `section.key=value` overrides and the DATA_DIR / DEVICE shortcuts."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass CONFIG= with an existing TOML file (see configs/)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        source = str(path)
    for text in overrides:
        section, key, value = _parse_override(text)
        *tables, key = key.split(".")
        table = raw
        for name in [section, *tables]:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {text!r}: {name} is not a table")
        table[key] = value
    if data_dir:
        # A folder the user brings is only ever read, never downloaded into.
        raw.setdefault("data", {}).update(root=str(data_dir), download=False)
    if device:
        raw.setdefault("runtime", {})["device"] = device
    return config_from_dict(raw, source)


def describe_settings() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every setting, for docs and `--docs`; a sub-table's section is
    `section.table`, e.g. `heads.softmax`."""
    rows = []

    def describe(section: str, cls: type) -> None:
        tables_field = tables_field_of(cls)
        for spec in dataclasses.fields(cls):
            if spec is tables_field:
                continue
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
            doc = spec.metadata.get("doc", "")
            choices = choices_of(spec.metadata)
            if choices and "choose" not in doc:
                doc = f"{doc} Choices: {', '.join(choices)}."
            rows.append((section, spec.name, default, doc))
        for table, table_cls in (tables_field.metadata[TABLES]() if tables_field else {}).items():
            describe(f"{section}.{table}", table_cls)

    for name, cls in section_types().items():
        if name == "weights":
            rows.append(("weights", "<backbone name>", "", "Explicit weight file for that backbone (checked first)."))
            continue
        describe(name, cls)
    return rows
