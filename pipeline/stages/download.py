"""The download stage: make the dataset available (download or DATA_DIR) and verify it.

Flowers-102 keeps its own path (pipeline.data); the other kinds go through pipeline.datasets.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import atomic, data, datasets
from ..config import Config
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage

UNIT = "flowers-102"


def data_root(config: Config) -> Path:
    """The configured data root, relative paths taken from the working directory (the project root under make)."""
    return Path(config.data.root).expanduser().resolve()


def fingerprint_memo(cache_root: Path, folder: Path) -> Path:
    """Where the per-file digests of the data behind `folder` are memoised (one file per data folder)."""
    name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(cache_root) / ".data-digests" / f"{name}.json"


def plan(config: Config, graph) -> list[Unit]:
    if config.data.dataset != datasets.FLOWERS:
        return [other_kind_unit(config, graph)]
    folder = data.dataset_folder(data_root(config))
    settings = {
        "folder": str(folder),
        "check_md5": config.data.check_md5,
        "num_classes": config.data.num_classes,
        "expected_images": config.data.expected_images,
        "expected_split_sizes": list(config.data.expected_split_sizes),
        "check_images": config.data.check_images,
        "skip_bad_images": config.data.skip_bad_images,
        # Content, not just the path: other data behind the same path must rebuild downstream.
        "fingerprint": data.fingerprint(folder, fingerprint_memo(graph.cache_root, folder)),
    }
    return [Unit(stage="download", name=UNIT, code_version="1", settings=settings)]


def other_kind_unit(config: Config, graph) -> Unit:
    """The unit for a folder tree or a torchvision dataset: its kind, checks and content in the key."""
    settings = config.data
    folder = datasets.dataset_folder(settings, data_root(config))
    checked = ("dataset", "num_classes", "expected_images", "expected_split_sizes", "check_images", "skip_bad_images")
    unit_settings = {name: getattr(settings, name) for name in checked}
    unit_settings.update(
        folder=str(folder),
        # The carve is made only when the data has no val split, but naming it always is harmless.
        val_fraction=settings.val_fraction,
        split_seed=settings.split_seed,
        fingerprint=datasets.fingerprint(settings, data_root(config), fingerprint_memo(graph.cache_root, folder)),
    )
    return Unit(stage="download", name=settings.dataset, code_version="1", settings=unit_settings)


def build(context: BuildContext) -> BuildResult:
    config = context.config
    root = data_root(config)
    if config.data.dataset != datasets.FLOWERS:
        index = datasets.read(config.data, root, config.data.split_seed)
        return _finish(
            context,
            index,
            datasets.dataset_folder(config.data, root),
            lambda memo: datasets.fingerprint(config.data, root, memo, write_memo=True),
        )
    folder = data.dataset_folder(root)
    try:
        index = data.verify(folder, config.data)
    except data.DataError:
        present = (folder / "jpg").is_dir()
        # Never download over data that exists but is broken: the error says what is wrong with it.
        if not config.data.download or present:
            raise
        context.log(f"[download] fetching Flowers-102 into {root} ...")
        data.download(root)
        folder = data.dataset_folder(root)
        index = data.verify(folder, config.data)
    return _finish(context, index, folder, lambda memo: data.fingerprint(folder, memo, write_memo=True))


def _finish(context: BuildContext, index: data.DatasetIndex, folder: Path, remember) -> BuildResult:
    if index.skipped:
        context.log(
            f"[download] warning: skipped {len(index.skipped)} unreadable image(s): "
            + ", ".join(f"{name} ({reason})" for name, reason in index.skipped)
        )
    atomic.write_json_atomic(context.directory / data.INDEX, index.to_json())
    # Remember every file's digest, so later plans only stat the files (planning itself writes nothing).
    remember(fingerprint_memo(context.cache_root, folder))
    sizes = {split: int(len(index.image_ids[split])) for split in data.SPLITS}
    context.log(
        "[download] verified " + ", ".join(f"{split} {size}" for split, size in sizes.items()) + f" images in {folder}"
    )
    return BuildResult(
        files=[data.INDEX],
        metrics={"split_sizes": sizes, "num_classes": len(index.class_names), "skipped_images": len(index.skipped)},
        extra={"folder": str(folder)},
    )


STAGE = register_stage(
    Stage(
        name="download",
        description="Locate or download the dataset and verify it.",
        code_version="1",
        plan=plan,
        build=build,
    )
)
