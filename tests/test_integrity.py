"""Nothing silently wrong: every damaged artifact is rebuilt or refused, and every bad input, setting
or file-system fault ends in a one-line error, never in a wrong number or a traceback.

One tiny study is built in-process once; each test damages a copy of it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import numpy
import pytest
from helpers import PROJECT, one_line_error, stage_arguments

from pipeline import (
    atomic,
    backbones,
    cache,
    checkpoints,
    cli,
    config,
    data,
    head_kinds,
    images,
    integrity,
    pixels,
    report_format,
    train,
)
from pipeline import predict as predict_module
from pipeline.head_kinds import fitting

# One of each kind of file the tiny study's manifests list.
ARTIFACT_SUFFIXES = {".h5", ".pt", ".joblib", ".json", ".png", ".csv", ".md", ".html"}


def flip_byte(path: Path, position: float = 0.5) -> None:
    """Invert one byte in place (size kept), the way bit rot or a stray write would."""
    payload = bytearray(path.read_bytes())
    index = min(len(payload) - 1, int(len(payload) * position))
    payload[index] ^= 0xFF
    path.write_bytes(bytes(payload))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def listed_artifacts(cache_root: Path) -> list[tuple[Path, str, dict]]:
    found = []
    for manifest_path in sorted(cache_root.glob("*/*/manifest.json")):
        manifest = cache.read_manifest(manifest_path.parent)
        assert manifest is not None, manifest_path
        found += [(manifest_path.parent, name, manifest) for name in manifest["files"]]
    return found


def results(cache_root: Path) -> dict:
    """test top-1 of every arm in the study's results.json."""
    records = json.loads((cache_root / "report" / "study" / "results.json").read_text())
    return {record["run"]: record["test_top1"] for record in records}


@pytest.fixture(scope="module")
def built_study(tmp_path_factory, fake_flowers_session) -> Path:
    root = tmp_path_factory.mktemp("integrity") / "cache"
    assert cli.run_all(stage_arguments(fake_flowers_session, root)) == 0
    return root


@pytest.fixture
def study_copy(built_study, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built_study, copy)
    return copy


# --- what the cache serves ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped byte", "truncated"])
def test_every_artifact_a_manifest_lists_reads_as_damaged_once_changed(study_copy, damage):
    artifacts = listed_artifacts(study_copy)
    assert {Path(name).suffix for _, name, _ in artifacts} >= ARTIFACT_SUFFIXES
    for directory, name, manifest in artifacts:
        path = directory / name
        original = path.read_bytes()
        damage(path)
        reason = cache.invalid_reason(directory, manifest["key"])
        assert reason is not None and "damaged" in reason, (path, reason)
        with pytest.raises(integrity.DamagedArtifact):
            cache.require_intact(path)
        path.write_bytes(original)
        assert cache.invalid_reason(directory, manifest["key"]) is None, path


@pytest.mark.slow
def test_an_edited_manifest_reads_as_absent(study_copy):
    directory = study_copy / "heads" / "tiny-resnet-softmax"
    manifest = json.loads((directory / cache.MANIFEST).read_text())
    manifest["metrics"]["test_top1"] = 0.99
    (directory / cache.MANIFEST).write_text(json.dumps(manifest))
    assert cache.read_manifest(directory) is None


@pytest.mark.slow
def test_flipped_features_are_rebuilt_and_give_the_original_numbers(
    study_copy, fake_flowers_session, built_study, capsys
):
    flip_byte(study_copy / "features" / "tiny-resnet" / "features.h5", 0.6)
    assert cli.run_all(stage_arguments(fake_flowers_session, study_copy)) == 0
    log = capsys.readouterr().out
    assert "[features] tiny-resnet: building (features.h5 is damaged" in log, log
    assert "[heads] tiny-resnet-softmax: building (input features/tiny-resnet was rebuilt)" in log, log
    assert results(study_copy) == results(built_study)


@pytest.mark.parametrize(
    "unit, name",
    [
        ("heads/tiny-efficientnet-logistic", "result.json"),
        ("heads/tiny-resnet-softmax", "head.pt"),
        ("heads/tiny-resnet-logistic", "head.joblib"),
        ("report/study", "results.json"),
    ],
)
@pytest.mark.slow
def test_edited_or_truncated_results_are_rebuilt_never_shown(
    study_copy, fake_flowers_session, built_study, capsys, unit, name
):
    path = study_copy / unit / name
    if path.suffix == ".json":
        path.write_text(path.read_text().replace('"test_top1": 0.', '"test_top1": 0.9', 1)[:-20])
    else:
        flip_byte(path)
    assert cli.run_all(stage_arguments(fake_flowers_session, study_copy)) == 0
    assert (
        f"{unit.replace('/', '] ', 1).replace('heads]', '[heads]').replace('report]', '[report]')}: building ("
        f"{name} is damaged" in capsys.readouterr().out
    )
    assert results(study_copy) == results(built_study)


@pytest.mark.slow
def test_predict_refuses_a_damaged_model_in_one_line(study_copy, fake_flowers_session, capsys):
    flip_byte(study_copy / "finetune" / "tiny-resnet" / "model.pt", 0.7)
    image = next((data.dataset_folder(fake_flowers_session) / "jpg").iterdir())
    code = predict_module.main(
        stage_arguments(fake_flowers_session, study_copy) + ["--arm", "finetune-tiny-resnet", str(image)]
    )
    assert code == 2
    error = one_line_error(capsys)
    assert "finetune-tiny-resnet" in error and "not trained yet" in error and "damaged" in error, error


@pytest.mark.slow
def test_predict_refuses_a_head_damaged_after_the_graph_checked_it(study_copy, tiny_config):
    head = study_copy / "heads" / "tiny-resnet-softmax" / "head.pt"
    flip_byte(head)
    with pytest.raises(integrity.DamagedArtifact, match="head.pt is damaged"):
        predict_module.head_probabilities(head.parent)


def test_sealed_files_refuse_any_change(tmp_path):
    path = tmp_path / "memo.bin"
    integrity.write_sealed(path, b"payload" * 1000)
    assert integrity.read_sealed(path) == b"payload" * 1000
    for damage in (flip_byte, truncate):
        integrity.write_sealed(path, b"payload" * 1000)
        damage(path)
        with pytest.raises(integrity.DamagedArtifact):
            integrity.read_sealed(path)
    path.write_bytes(b"not sealed at all")
    with pytest.raises(integrity.DamagedArtifact, match="not a sealed file"):
        integrity.read_sealed(path)


def test_a_damaged_checkpoint_is_never_resumed(tmp_path):
    import torch

    path = tmp_path / checkpoints.CHECKPOINT
    buffer = io.BytesIO()
    torch.save({"key": "k", "epoch": 3, "model": {"weight": torch.ones(64, 64)}}, buffer)
    integrity.write_sealed(path, buffer.getbuffer())
    assert checkpoints.read_checkpoint(path, "k", log=lambda line: None)["epoch"] == 3
    flip_byte(path, 0.8)
    said = []
    assert checkpoints.read_checkpoint(path, "k", log=said.append) is None
    assert said and "ignoring unreadable checkpoint" in said[0] and "damaged" in said[0], said


def test_a_damaged_image_cache_is_decoded_again(tmp_path, fake_flowers_session):
    index = data.verify(
        data.dataset_folder(fake_flowers_session),
        config.load_config(PROJECT / "configs" / "tiny.toml", [f'data.root="{fake_flowers_session}"']).data,
    )
    said = []
    preprocessing = backbones.get_backbone("tiny-resnet").preprocessing
    first = images.load_image_sets(index, tmp_path, 24, preprocessing, 16, log=said.append)["val"].rows
    expected = numpy.load(first.path)
    flip_byte(first.path, 0.9)
    again = images.load_image_sets(index, tmp_path, 24, preprocessing, 16, log=said.append)["val"].rows
    assert any("damaged" in line for line in said), said
    assert numpy.array_equal(numpy.load(again.path), expected)


def test_a_full_disk_while_caching_images_ends_in_one_line_and_leaves_nothing(
    tmp_path, fake_flowers_session, monkeypatch
):
    index = data.verify(
        data.dataset_folder(fake_flowers_session),
        config.load_config(PROJECT / "configs" / "tiny.toml", [f'data.root="{fake_flowers_session}"']).data,
    )
    preprocessing = backbones.get_backbone("tiny-resnet").preprocessing
    monkeypatch.setenv(atomic.FAULT_VARIABLE, "*/val-eval-*.npy:full")
    with pytest.raises(cache.CacheError, match="cannot write .*val-eval.*the disk is full") as caught:
        images.load_image_sets(index, tmp_path, 24, preprocessing, 16, log=lambda line: None, splits=("val",))
    assert "\n" not in str(caught.value)
    assert not [path.name for path in tmp_path.iterdir()]  # neither the array, its record nor a temporary file
    monkeypatch.delenv(atomic.FAULT_VARIABLE)
    rows = images.load_image_sets(index, tmp_path, 24, preprocessing, 16, log=lambda line: None, splits=("val",))
    assert rows["val"].rows.shape == (len(index.image_ids["val"]), 16, 16, 3)


# --- the data -------------------------------------------------------------------------------------


def test_the_fingerprint_covers_every_image_s_content_and_reruns_only_stat(fake_flowers, tmp_path, monkeypatch):
    folder = data.dataset_folder(fake_flowers)
    memo = tmp_path / "digests.json"
    before = data.fingerprint(folder, memo, write_memo=True)
    hashed = []
    original = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda path: hashed.append(path) or original(path))
    assert data.fingerprint(folder, memo) == before and hashed == []
    image = sorted((folder / "jpg").iterdir())[3]
    status = image.stat()
    flip_byte(image, 0.7)  # same size, same mtime: only the content differs
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert data.fingerprint(folder, memo) != before
    assert hashed == [image]


def test_planning_creates_no_memo_but_refreshes_a_stale_one(fake_flowers, tmp_path, monkeypatch):
    folder = data.dataset_folder(fake_flowers)
    memo = tmp_path / "digests.json"
    before = data.fingerprint(folder, memo)
    assert not memo.exists()  # planning a cache that was never built leaves nothing behind
    data.fingerprint(folder, memo, write_memo=True)
    for image in (folder / "jpg").iterdir():
        os.utime(image)  # a copy or a touch: same content, new times
    hashed = []
    original = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda path: hashed.append(path) or original(path))
    assert data.fingerprint(folder, memo) == before and hashed
    hashed.clear()
    assert data.fingerprint(folder, memo) == before and hashed == []


def _rewrite_mat(folder: Path, name: str, **values) -> None:
    from scipy.io import loadmat, savemat

    content = {key: value for key, value in loadmat(folder / name).items() if not key.startswith("__")}
    savemat(folder / name, {**content, **values})


def test_labels_must_be_whole_numbers(fake_flowers, tiny_config):
    folder = data.dataset_folder(fake_flowers)
    from scipy.io import loadmat

    labels = loadmat(folder / "imagelabels.mat")["labels"].astype(numpy.float64)
    labels[0, 4] = 2.7
    _rewrite_mat(folder, "imagelabels.mat", labels=labels)
    with pytest.raises(data.DataError, match="not whole numbers, e.g. 2.7 at position 4"):
        data.verify(folder, tiny_config.data)


def test_image_ids_must_be_unique_within_a_split(fake_flowers, tiny_config):
    folder = data.dataset_folder(fake_flowers)
    from scipy.io import loadmat

    train_ids = loadmat(folder / "setid.mat")["trnid"].copy()
    train_ids[0, 1] = train_ids[0, 0]
    _rewrite_mat(folder, "setid.mat", trnid=train_ids)
    with pytest.raises(data.DataError, match=f"lists image {train_ids[0, 0]} more than once"):
        data.verify(folder, tiny_config.data)


def corrupt_scan(path: Path) -> None:
    """Put a restart marker in the middle of the entropy-coded data: libjpeg warns and still makes pixels."""
    payload = bytearray(path.read_bytes())
    start = payload.find(b"\xff\xda")
    position = start + (len(payload) - start) // 2
    payload[position : position + 2] = b"\xff\xd3"
    path.write_bytes(bytes(payload))


def test_jpeg_data_libjpeg_reports_as_corrupt_is_refused_or_skipped(fake_flowers, tiny_config):
    from PIL import Image

    folder = data.dataset_folder(fake_flowers)
    image = sorted((folder / "jpg").iterdir())[5]
    corrupt_scan(image)
    with Image.open(image) as opened:
        opened.load()  # PIL alone would use it: the damage only shows as a warning
    assert "Corrupt JPEG data" in pixels.decode_problem(image)
    with pytest.raises(data.DataError, match=f"{image.name} .*Corrupt JPEG data"):
        data.verify(folder, tiny_config.data)
    skipping = dataclasses.replace(tiny_config.data, skip_bad_images=True)
    assert [name for name, _ in data.verify(folder, skipping).skipped] == [image.name]


def test_unreadable_data_ends_in_one_line(fake_flowers, tmp_path, capsys, monkeypatch):
    folder = data.dataset_folder(fake_flowers)
    image = sorted((folder / "jpg").iterdir())[2]
    image.unlink()
    image.symlink_to(folder / "jpg" / "nowhere.jpg")  # dangling link
    assert cli.run_stage("download", stage_arguments(fake_flowers, tmp_path / "cache")) == 2
    assert "dangling link" in one_line_error(capsys)
    image.unlink()
    shutil.copy(sorted((folder / "jpg").iterdir())[0], image)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder / "setid.mat"))

    monkeypatch.setattr("scipy.io.loadmat", denied)
    assert cli.run_stage("download", stage_arguments(fake_flowers, tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "setid.mat" in error and "Permission denied" in error and "readable" in error, error


# --- settings and training -----------------------------------------------------------------------------


def float_settings() -> list[tuple[str, str, bool]]:
    """(section, key, is a list) of every float setting, found from the config's own dataclasses and their
    sub-tables (`heads.logistic`, ...)."""
    found = []

    def walk(section: str, section_type: type) -> None:
        hints = get_type_hints(section_type)
        for field in dataclasses.fields(section_type):
            if config.TABLES in field.metadata:
                for table, table_type in field.metadata[config.TABLES]().items():
                    walk(f"{section}.{table}", table_type)
                continue
            hint = hints[field.name]
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
            if hint is float:
                found.append((section, field.name, False))
            elif (get_origin(hint) is list and get_args(hint) == (float,)) or (
                hint is list and default and all(isinstance(item, float) for item in default)
            ):
                found.append((section, field.name, True))

    for section, section_type in config.section_types().items():
        if dataclasses.is_dataclass(section_type):
            walk(section, section_type)
    return found


@pytest.mark.parametrize("section, key, listed", float_settings(), ids=lambda value: str(value))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(section, key, listed, value):
    literal = f"[{value}]" if listed else value
    with pytest.raises(config.ConfigError, match=f"\\[{section}\\] {key} = .* is not a finite number"):
        config.load_config(PROJECT / "configs" / "tiny.toml", [f"{section}.{key}={literal}"])


def test_float_settings_are_found():
    keys = {f"{section}.{key}" for section, key, _ in float_settings()}
    assert {
        "finetune.lr",
        "cnn.dropout",
        "features.view_minimum_scale",
        "heads.logistic.cs",
        "heads.knn.temperatures",
    } <= keys


@pytest.mark.slow
def test_training_with_a_non_finite_loss_stops_in_one_line_and_caches_nothing(
    fake_flowers_session, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(train, "train_step", lambda *args, **kwargs: (float("nan"), 0))
    root = tmp_path / "cache"
    assert cli.run_stage("finetune", stage_arguments(fake_flowers_session, root)) == 2
    error = one_line_error(capsys)
    assert "training diverged" in error and "nothing was cached" in error, error
    assert cache.read_manifest(root / "finetune" / "tiny-resnet") is None


def test_a_head_with_non_finite_weights_is_refused():
    import torch

    payload = {"state_dict": {"weight": torch.full((3, 4), float("nan")), "bias": torch.zeros(3)}}
    with pytest.raises(head_kinds.HeadError, match="diverged"):
        fitting.require_finite(head_kinds.get_head_kind("softmax"), payload, "tiny-resnet-softmax")


# --- writes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_during_feature_extraction_is_one_line(fake_flowers_session, tmp_path, capsys, monkeypatch):
    import h5py

    original = h5py.Dataset.__setitem__

    def full(dataset, selection, value):
        if dataset.name.endswith("/features"):
            # What h5py raises when the disk fills up under it (seen on a full tmpfs).
            raise RuntimeError(
                "Can't decrement id ref count (file write failed: time = now, filename = 'x', "
                "errno = 28, error message = 'No space left on device')"
            )
        original(dataset, selection, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    assert cli.run_stage("features", stage_arguments(fake_flowers_session, tmp_path / "cache")) == 2
    error = one_line_error(capsys)
    assert "features.h5" in error and "disk is full" in error, error


def small_file_system(path: Path) -> bool:
    """Mount a 4 MiB tmpfs at `path` (root only); False where this machine does not allow it."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_really_full_disk_during_feature_extraction_is_one_line(fake_flowers_session, tmp_path):
    root = tmp_path / "small"
    if not small_file_system(root):
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated full disk test covers the path")
    python = str(PROJECT / ".venv" / "bin" / "python") if (PROJECT / ".venv").exists() else "python"
    try:

        def stage(name: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [python, "-m", f"stages.{name}", *stage_arguments(fake_flowers_session, root / "cache")],
                cwd=PROJECT,
                capture_output=True,
                text=True,
                timeout=300,
            )

        assert stage("download").returncode == 0
        status = os.statvfs(root)
        # Leave a few KiB: enough to start the features file, not to finish it.
        (root / "filler").write_bytes(bytes(status.f_bavail * status.f_frsize - 8 * 1024))
        finished = stage("features")
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2, finished.stderr
    assert lines[-1].startswith("error: cannot write") and "features.h5" in lines[-1], finished.stderr
    assert "disk is full" in lines[-1] and "Traceback" not in finished.stderr, finished.stderr


@pytest.mark.slow
def test_an_unwritable_unit_during_invalidation_is_one_line(
    built_study, tmp_path, fake_flowers_session, capsys, monkeypatch
):
    copy = tmp_path / "cache"
    shutil.copytree(built_study, copy)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", denied)
    monkeypatch.setattr(Path, "unlink", denied)
    assert cli.run_invalidate(stage_arguments(fake_flowers_session, copy) + ["heads"]) == 2
    error = one_line_error(capsys)
    assert "Permission denied" in error and str(copy) in error, error


@pytest.mark.subprocess
@pytest.mark.parametrize("count", ["0", "-1", "abc", "1.5"])
def test_make_refuses_a_bad_process_count_in_one_line(count):
    finished = subprocess.run(["make", "-n", "all", f"NPROC={count}"], cwd=PROJECT, capture_output=True, text=True)
    assert finished.returncode == 2
    assert f"error: NPROC={count} is not a positive whole number" in finished.stderr, finished.stderr


@pytest.mark.subprocess
def test_make_quotes_path_variables():
    finished = subprocess.run(
        ["make", "-n", "all", "DATA_DIR=/data/my flowers;rm -rf x", "CONFIG=a b.toml"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert "--data-dir '/data/my flowers;rm -rf x'" in finished.stdout and "--config 'a b.toml'" in finished.stdout


# --- weights -----------------------------------------------------------------------------------------


def test_weights_under_another_name_are_checked_against_the_published_hash(tmp_path):
    spec = backbones.get_backbone("resnet18")
    other = tmp_path / "my-resnet18.pth"
    other.write_bytes(b"not the published weights")
    assert backbones.weights_verified(spec, other) == "no"
    published = dataclasses.replace(
        spec, weights=dataclasses.replace(spec.weights, sha256_prefix=backbones.weights_fingerprint(other)[:8])
    )
    assert backbones.weights_verified(published, other) == "yes"
    unpublished = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, sha256_prefix=None))
    assert backbones.weights_verified(unpublished, other) == "unknown"


def test_the_report_names_arms_with_unverified_weights():
    record = {
        "arm": "frozen-resnet18-softmax",
        "run": "frozen-resnet18-softmax",
        "status": "ok",
        "val_top1": 0.5,
        "test_top1": 0.5,
        "test_mean_per_class": 0.5,
        "extract_seconds": 1.0,
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
        "total_seconds": 3.0,
        "images_per_second": 10.0,
        "weights_verified": "no",
        "seed": 0,
        "method": "frozen",
        "backbone": "resnet18",
        "head": "softmax",
    }
    assert "unverified weights: frozen-resnet18-softmax" in report_format.text_table([record])


# --- predict inputs ------------------------------------------------------------------------------------


def picture() -> numpy.ndarray:
    """A 32 x 32 RGB picture with structure in every channel."""
    ramp = numpy.linspace(0, 255, 32)
    return numpy.stack(
        [numpy.add.outer(ramp, ramp) / 2, numpy.tile(ramp, (32, 1)), numpy.tile(ramp[::-1, None], (1, 32))], axis=-1
    ).astype(numpy.uint8)


def grey_of(rgb: numpy.ndarray) -> numpy.ndarray:
    from PIL import Image

    return numpy.asarray(Image.fromarray(rgb).convert("L"), dtype=numpy.float64)


MODES = [
    "1",
    "L",
    "P",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "F",
    "RGBA",
    "LA",
    "La",
    "PA",
    "RGBa",
    "P+transparency",
]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_converts_to_rgb_keeping_the_picture(mode):
    from PIL import Image

    reference = picture()
    grey = grey_of(reference)
    if mode == "I;16":
        image = Image.fromarray((grey * 257).astype(numpy.uint16))  # full 16-bit range
        expected = numpy.repeat(grey[..., None], 3, axis=-1)
    elif mode == "I":
        image = Image.fromarray((grey * 257).astype(numpy.int32))
        expected = numpy.repeat(grey[..., None], 3, axis=-1)
    elif mode == "F":
        image = Image.fromarray((grey / 255).astype(numpy.float32))  # values in [0, 1]
        expected = numpy.repeat(grey[..., None], 3, axis=-1)
    elif mode in ("RGBA", "LA", "La", "PA", "RGBa", "P+transparency"):
        rgba = Image.fromarray(reference).convert("RGBA")
        alpha = numpy.full((32, 32), 255, dtype=numpy.uint8)
        alpha[:, :16] = 0  # left half transparent
        rgba.putalpha(Image.fromarray(alpha))
        if mode == "P+transparency":
            image = rgba.convert("P")
            image.info["transparency"] = image.getpixel((0, 0))
        elif mode == "La":
            image = Image.frombytes(
                "La",
                rgba.size,
                numpy.stack([numpy.rint(grey * alpha / 255), alpha], axis=-1).astype(numpy.uint8).tobytes(),
            )
        elif mode in ("LA", "PA"):
            image = rgba.convert("LA" if mode == "LA" else "P").convert(mode)
            if mode == "PA":
                image.putalpha(Image.fromarray(alpha))
        else:
            image = rgba.convert(mode)
        expected = (
            reference.astype(numpy.float64)
            if mode in ("RGBA", "RGBa", "P+transparency", "PA")
            else numpy.repeat(grey[..., None], 3, axis=-1)
        )
        expected = expected.copy()
        expected[:, :16] = 255  # transparent: the white backdrop
    else:
        image = Image.fromarray(reference).convert(mode)
        expected = numpy.asarray(image.convert("RGB"), dtype=numpy.float64)
    converted = pixels.to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (32, 32)
    got = numpy.asarray(converted, dtype=numpy.float64)
    # Palette modes quantise colours; everything else keeps the picture to a level or two.
    tolerance = 24 if mode.startswith("P") else 2
    if mode == "P+transparency":
        got, expected = got[:, 16:], expected[:, 16:]
        assert numpy.all(numpy.asarray(converted)[0, 0] == 255)
    assert numpy.abs(got - expected).mean() <= tolerance, (mode, numpy.abs(got - expected).mean())
    assert got.std() > 20, "the picture must survive, not turn into one flat colour"


def test_predict_reads_16_bit_and_transparent_images_and_refuses_corrupt_jpegs(tmp_path, fake_flowers_session):
    from PIL import Image

    grey = grey_of(picture())
    Image.fromarray((grey * 257).astype(numpy.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(picture()).convert("RGBA").save(tmp_path / "cutout.png")
    assert [path.name for path in predict_module.image_files([str(tmp_path)])] == ["cutout.png", "deep.png"]
    corrupt = tmp_path / "corrupt.jpg"
    shutil.copy(sorted((data.dataset_folder(fake_flowers_session) / "jpg").iterdir())[0], corrupt)
    corrupt_scan(corrupt)
    with pytest.raises(predict_module.PredictError, match="corrupt.jpg is not a readable image .*Corrupt JPEG"):
        predict_module.image_files([str(corrupt)])


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_damaged_partial_features_file_is_extracted_again_not_resumed(
    fake_flowers_session, built_study, tmp_path, capsys
):
    import sys

    import h5py

    from pipeline import features_h5

    root = tmp_path / "cache"
    environment = {**os.environ, "FAULT_HDF5_WRITE": "2", "FAULT_BLOCK_ROWS": "16", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "tests/fault_driver.py", "features", *stage_arguments(fake_flowers_session, root)],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    partial = root / "features" / "tiny-resnet" / "features.h5.partial"
    with h5py.File(partial, "a") as handle:
        assert int(handle["train"].attrs["rows_done"]) == 16
        handle["train"]["features"][3, 0] += 1.0  # a flushed row changes after it was written
    assert cli.run_stage("features", stage_arguments(fake_flowers_session, root)) == 0
    log = capsys.readouterr().out
    assert "[features] train: the partial file's rows do not match their digests" in log, log
    assert "resuming train" not in log
    for group in ("train", "val", "test"):
        got = features_h5.read_group(root / "features" / "tiny-resnet" / "features.h5", group)["features"]
        expected = features_h5.read_group(built_study / "features" / "tiny-resnet" / "features.h5", group)["features"]
        assert numpy.array_equal(got, expected), group
