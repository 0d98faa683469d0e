"""The features stage: HDF5 schema, cache keys, frozen BatchNorm, kill-safety and resume, weights errors.

Tiny random-init backbones on the fake Flowers-102 (32 px); nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
from pathlib import Path

import h5py
import numpy
import pytest
import torch
from helpers import make_tiny_config

from pipeline import backbones, cli, extract, features_h5, frozen, transforms
from pipeline.backbones import BackboneSpec, TinyResNet, WeightsSource, WeightsUnavailableError
from pipeline.data import load_index
from pipeline.graph import Graph
from pipeline.runtime import Runtime

ONE_BACKBONE = ('features.backbones=["tiny-resnet"]',)
# One torch thread: with two, OpenMP spins on the shared cores and these tiny extractions took 3-10x the CPU.
# The stage's thread-dependent choices are pinned where a test is about them (streams, thread split).
pytestmark = pytest.mark.usefixtures("one_thread")


def cpu_runtime(**changes) -> Runtime:
    """fp32 on the CPU, channels_last, no workers, one stream, unless `changes` say otherwise."""
    return dataclasses.replace(Runtime("cpu", "fp32", channels_last=True, num_workers=0, seed=0), **changes)


QUIET = extract.ExtractionOptions(batch_size=3, progress=False)


def graph_for(config):
    lines = []
    return Graph(config, log=lines.append), lines


def tiny(tmp_path, data_root, *overrides, cache_name="cache"):
    return make_tiny_config(data_root, tmp_path / cache_name, ONE_BACKBONE + overrides)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and downloads that fail as they would offline."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / "hub"))

    def refuse(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "hub" / "checkpoints"


def test_hdf5_schema_matches_the_split_index(tmp_path, fake_flowers_session):
    # Two extraction streams, as auto picks on 2 cores: the stage's streams path, whatever the thread count here.
    graph, lines = graph_for(
        make_tiny_config(fake_flowers_session, tmp_path / "cache", ("runtime.inference_streams=2",))
    )
    manifests = graph.run("features")
    assert [manifest["unit"] for manifest in manifests] == ["tiny-resnet", "tiny-efficientnet"]
    index = load_index(graph.directory(graph.units("download")[0]))
    for manifest in manifests:
        name = manifest["unit"]
        spec = backbones.get_backbone(name)
        path = features_h5.features_file(graph.directory(graph.unit("features", name)))
        assert manifest["files"] == [features_h5.FEATURES_FILE]
        assert not list(path.parent.glob("*.partial"))
        with h5py.File(path, "r") as handle:
            assert sorted(handle.keys()) == ["test", "train", "val"]
            for split in ("train", "val", "test"):
                group = handle[split]
                rows = len(index.labels[split])
                assert group["features"].shape == (rows, spec.feature_dim)
                assert group["features"].dtype == numpy.float32
                assert numpy.isfinite(group["features"][:]).all()
                numpy.testing.assert_array_equal(group["labels"][:], index.labels[split])
                numpy.testing.assert_array_equal(group["image_ids"][:], index.image_ids[split])
                assert (group["views"][:] == 0).all()
        attributes = features_h5.read_attributes(path)
        assert attributes["backbone"] == name and attributes["complete"] is True
        assert attributes["weights_id"] == attributes["weights_sha256"] == "random-init"
        assert attributes["input_size"] == 32 and attributes["preprocessing"]["input_size"] == 32
        assert attributes["precision"] in ("bf16", "fp32") and attributes["feature_dim"] == spec.feature_dim
        assert len(attributes["class_names"]) == 6
        assert set(attributes["timings"]) == {"train", "val", "test"}
        assert all(record["seconds"] > 0 for record in attributes["timings"].values())
        assert manifest["timings"]["extract_seconds"] == pytest.approx(
            sum(record["seconds"] for record in attributes["timings"].values())
        )
        assert manifest["settings"]["weights_sha256"] == "random-init"
        for split in ("train", "val", "test"):
            assert manifest["timings"][f"extract_{split}_seconds"] > 0
            assert any(f"{name} {split}:" in line and "img/s" in line for line in lines)
        assert manifest["timings"]["model_load_seconds"] >= 0


def test_augmented_views_are_extra_rows_and_reproducible(tmp_path, fake_flowers_session):
    config = tiny(tmp_path, fake_flowers_session, "features.augmented_views=2")
    graph, _ = graph_for(config)
    graph.run("features")
    path = features_h5.features_file(graph.directory(graph.unit("features", "tiny-resnet")))
    train = features_h5.read_group(path, "train")
    augmented = features_h5.read_group(path, features_h5.AUGMENTED_GROUP)
    assert augmented["features"].shape == (48, 32)
    numpy.testing.assert_array_equal(augmented["views"], numpy.repeat([1, 2], 24))
    numpy.testing.assert_array_equal(augmented["image_ids"], numpy.tile(train["image_ids"], 2))
    numpy.testing.assert_array_equal(augmented["labels"], numpy.tile(train["labels"], 2))
    # Random crops: the two views of an image differ from each other and from the eval crop.
    assert not numpy.allclose(augmented["features"][:24], augmented["features"][24:])
    assert not numpy.allclose(augmented["features"][:24], train["features"])
    again, _ = graph_for(tiny(tmp_path, fake_flowers_session, "features.augmented_views=2", cache_name="other"))
    again.run("features")
    repeat = features_h5.read_group(
        features_h5.features_file(again.directory(again.unit("features", "tiny-resnet"))), features_h5.AUGMENTED_GROUP
    )
    numpy.testing.assert_allclose(repeat["features"], augmented["features"], rtol=1e-5, atol=1e-6)


def test_cache_hit_miss_and_what_enters_the_key(tmp_path, fake_flowers_session):
    graph, lines = graph_for(tiny(tmp_path, fake_flowers_session))
    first = graph.run("features")[0]
    again, lines = graph_for(tiny(tmp_path, fake_flowers_session, "features.batch_size=5"))
    assert again.run("features")[0]["build_id"] == first["build_id"]  # batch size changes no number
    assert any("cached" in line for line in lines)
    changed, lines = graph_for(tiny(tmp_path, fake_flowers_session, "features.input_size=40"))
    rebuilt = changed.run("features")[0]
    assert rebuilt["build_id"] != first["build_id"] and rebuilt["settings"]["input_size"] == 40
    assert any("settings changed" in line for line in lines)
    views, _ = graph_for(tiny(tmp_path, fake_flowers_session, "features.augmented_views=1"))
    assert views.unit("features", "tiny-resnet").settings["seed"] == 0
    plain = graph.unit("features", "tiny-resnet").settings
    assert "seed" not in plain  # without random views the seed changes nothing
    unfolded, _ = graph_for(tiny(tmp_path, fake_flowers_session, "features.fold_batchnorm=false"))
    assert plain["fold_batchnorm"] and "fold_batchnorm" not in unfolded.unit("features", "tiny-resnet").settings


def test_backbone_batchnorm_statistics_do_not_move():
    model = frozen.load_frozen_backbone("tiny-resnet", None, "cpu", channels_last=True)
    model.train()  # whatever mode it arrives in, extraction must freeze it
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = [torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8) for _ in range(3)]
    batches = list(extract.extract_batches(model, images, cpu_runtime(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert [batch.shape for batch in batches] == [(4, 32)] * 3
    assert not any(module.training for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} moved during extraction"


def _trained_looking_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, so folding them is not close to a no-op."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("name", ["tiny-efficientnet", "tiny-resnet"])
def test_inference_rewrite_folds_every_batchnorm_and_keeps_the_function(name):
    import copy

    from pipeline.cpu_rewrites import fold_for_inference

    spec = backbones.get_backbone(name)
    model = backbones.build_backbone(name, pretrained=False)
    backbones.strip_head(model, spec)
    model = _trained_looking_norms(extract.freeze(model))
    reference = copy.deepcopy(model)
    fold_for_inference(model, name)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    if name == "tiny-efficientnet":  # its stride-1 convolutions now pad internally
        assert any(
            isinstance(getattr(module, "static_padding", None), torch.nn.Identity) and module.padding != (0, 0)
            for module in model.modules()
        )
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-5)


def test_inference_rewrite_refuses_a_network_whose_registration_order_misleads():
    from pipeline.cpu_rewrites import fold_for_inference
    from pipeline.models import ModelError

    class Misordered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convolution = torch.nn.Conv2d(3, 4, 3)
            self.norm = torch.nn.BatchNorm2d(4)  # registered after `convolution` but reads `other`
            self.other = torch.nn.Conv2d(3, 4, 3)

        def forward(self, images):
            return (self.norm(self.other(images)) + self.convolution(images)).mean((2, 3))

    model = _trained_looking_norms(extract.freeze(Misordered()))
    with pytest.raises(ModelError, match="fold_batchnorm = false"):
        fold_for_inference(model, "misordered")


@pytest.mark.parametrize("name", ["tiny-efficientnet", "tiny-resnet"])
def test_head_is_stripped_where_the_family_keeps_it(name):
    spec = backbones.get_backbone(name)
    model = frozen.load_frozen_backbone(name, None, "cpu", channels_last=False)
    assert isinstance(getattr(model, spec.head_attribute), torch.nn.Identity)
    if spec.family == "efficientnet_pytorch":
        assert spec.head_attribute == "_fc" and not hasattr(model, "fc")  # `.fc` would be an unused layer
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, spec.feature_dim)


def _jobs(folder: Path, count: int = 10):
    from PIL import Image

    paths = []
    for number in range(count):
        path = folder / f"image_{number:05d}.jpg"
        Image.fromarray(numpy.full((16, 16, 3), number * 20, dtype=numpy.uint8)).save(path)
        paths.append(path)
    transform = transforms.eval_transform(backbones.get_backbone("tiny-resnet").preprocessing, 16)
    return [
        extract.Job(
            "train",
            paths,
            numpy.arange(count) % 3,
            numpy.arange(1, count + 1),
            numpy.zeros(count, dtype=numpy.int64),
            transform,
        )
    ]


def test_workers_decode_at_lowest_priority_and_give_inline_features(tmp_path):
    from torchvision import transforms as tv

    jobs = _jobs(tmp_path)
    niceness = tmp_path / "niceness"

    def record(image):
        niceness.write_text(str(os.nice(0)))
        return image

    recording = [
        dataclasses.replace(job, transform=tv.Compose([tv.Lambda(record), *job.transform.transforms])) for job in jobs
    ]
    model = frozen.load_frozen_backbone("tiny-resnet", None, "cpu", channels_last=True)
    extract.write_features(tmp_path / "inline.h5", "key", recording, model, 32, cpu_runtime(), QUIET)
    assert int(niceness.read_text()) == os.nice(0)
    extract.write_features(tmp_path / "workers.h5", "key", recording, model, 32, cpu_runtime(num_workers=2), QUIET)
    assert int(niceness.read_text()) == 19  # yield_to_compute ran in the worker
    assert numpy.array_equal(
        features_h5.read_group(tmp_path / "inline.h5", "train")["features"],
        features_h5.read_group(tmp_path / "workers.h5", "train")["features"],
    )


def test_streams_give_the_rows_of_one_stream_bit_for_bit_augmented_views_included(tmp_path):
    torch.set_num_threads(2)  # one stream runs the 2-thread model, two streams 1 thread each (restored after)
    jobs = _jobs(tmp_path)
    preprocessing = backbones.get_backbone("tiny-resnet").preprocessing
    views = dataclasses.replace(
        jobs[0],
        group="train_augmented",
        seed=3,
        views=numpy.ones(len(jobs[0].paths), int),
        transform=transforms.train_transform(preprocessing, 16, "crop-flip"),
    )
    model = frozen.load_frozen_backbone("tiny-resnet", None, "cpu", channels_last=True)
    extract.write_features(tmp_path / "one.h5", "key", jobs + [views], model, 32, cpu_runtime(), QUIET)
    two_streams = cpu_runtime(inference_streams=2)
    extract.write_features(tmp_path / "two.h5", "key", jobs + [views], model, 32, two_streams, QUIET)
    for group in ("train", "train_augmented"):
        one, two = (features_h5.read_group(tmp_path / name, group)["features"] for name in ("one.h5", "two.h5"))
        assert numpy.array_equal(one, two), group


def test_in_streams_keeps_order_splits_threads_and_stops_on_failure():
    import threading
    import time

    seen_threads, started = [], []

    def work(item):
        started.append(item)
        seen_threads.append((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.01 * (item % 3))  # finish out of order
        if item == 5:
            raise Interrupted("stream failed")
        return item * 10

    torch.set_num_threads(4)  # whatever this machine has: two streams must get 2 threads each (restored after)
    threads = torch.get_num_threads()
    assert list(extract.in_streams(work, range(5), 2)) == [0, 10, 20, 30, 40]
    assert {count for _, count in seen_threads} == {threads // 2}
    assert len({ident for ident, _ in seen_threads}) <= 2 and torch.get_num_threads() == threads
    started.clear()
    with pytest.raises(Interrupted):
        list(extract.in_streams(work, range(100), 2))
    assert len(started) < 20  # at most 2 x streams submitted ahead of the failure
    assert list(extract.in_streams(work, range(3), 1)) == [0, 10, 20]


class Interrupted(Exception):
    pass


def test_killed_extraction_leaves_no_complete_file_and_resumes(tmp_path):
    jobs = _jobs(tmp_path)
    model = frozen.load_frozen_backbone("tiny-resnet", None, "cpu", channels_last=False)
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 3:
            raise Interrupted("killed")
        return model(images)

    runtime, attributes = cpu_runtime(channels_last=False), {"backbone": "tiny-resnet"}
    target = tmp_path / "out" / "features.h5"
    target.parent.mkdir()
    wrapped = torch.nn.Module()
    wrapped.forward = failing
    with pytest.raises(Interrupted):
        extract.write_features(target, "key-1", jobs, wrapped, 32, runtime, QUIET, attributes)
    assert not target.exists()
    partial = target.with_name(target.name + ".partial")
    with h5py.File(partial, "r") as handle:
        assert handle.attrs["complete"] == False  # noqa: E712  (numpy bool)
        assert handle["train"].attrs["rows_done"] == 6
    lines = []
    logged = dataclasses.replace(QUIET, log=lines.append)
    extract.write_features(target, "key-1", jobs, model, 32, runtime, logged, attributes)
    assert any("resuming train at row 6" in line for line in lines)
    assert not partial.exists() and features_h5.read_attributes(target)["complete"]
    clean = tmp_path / "clean.h5"
    extract.write_features(clean, "key-1", jobs, model, 32, runtime, QUIET, attributes)
    numpy.testing.assert_allclose(
        features_h5.read_group(target, "train")["features"],
        features_h5.read_group(clean, "train")["features"],
        rtol=1e-6,
    )
    # A partial file made under other settings is never resumed.
    with pytest.raises(Interrupted):
        calls.clear()
        extract.write_features(target, "key-1", jobs, wrapped, 32, runtime, QUIET, attributes)
    lines.clear()
    extract.write_features(target, "key-2", jobs, model, 32, runtime, logged, attributes)
    assert not any("resuming" in line for line in lines)


def test_one_loader_serves_every_group_and_no_batch_spans_two(tmp_path):
    jobs = _jobs(tmp_path) + [dataclasses.replace(_jobs(tmp_path, 7)[0], group="val")]
    sizes = [len(job.paths) for job in jobs]
    assert sizes == [10, 7]
    batches = extract.batch_plan(jobs, [0] * len(jobs), 4)
    assert all(len({job for job, _ in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
    for number, size in enumerate(sizes):
        assert [row for batch in batches for job, row in batch if job == number] == list(range(size))
    # Resumed: a finished job gets no batch, a started one begins at its first missing row.
    resumed = extract.batch_plan(jobs, [sizes[0], 2], 4)
    assert all(job != 0 for batch in resumed for job, _ in batch)
    assert resumed[0][0] == (1, 2)


def test_incomplete_file_is_refused(tmp_path):
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["format_version"] = features_h5.FORMAT_VERSION
        handle.attrs["complete"] = False
    with pytest.raises(features_h5.FeaturesFileError, match="not a complete features file"):
        features_h5.read_attributes(path)


def test_offline_missing_weights_fail_at_build_with_the_fix(tmp_path, fake_flowers_session, hub_dir, capsys):
    config = make_tiny_config(fake_flowers_session, tmp_path / "cache", ('features.backbones=["resnet18"]',))
    graph, _ = graph_for(config)
    unit = graph.unit("features", "resnet18")  # planning works offline and never downloads
    assert unit.settings["weights_sha256"] == frozen.NOT_DOWNLOADED
    with pytest.raises(WeightsUnavailableError) as raised:
        graph.run("features")
    message = str(raised.value)
    assert "resnet18-f37072fd.pth" in message and "https://download.pytorch.org/" in message
    assert str(hub_dir) in message and "weights.resnet18" in message and "\n" not in message
    assert not features_h5.features_file(graph.directory(unit)).exists()
    arguments = [
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"),
        "--set",
        f'data.root="{fake_flowers_session}"',
        "--set",
        f'cache.root="{tmp_path / "cache"}"',
        "--set",
        'features.backbones=["resnet18"]',
    ]
    assert cli.run_stage("features", arguments) == 2
    assert "error: pretrained weights for resnet18 not found" in capsys.readouterr().err


def test_weights_fingerprint_enters_the_key_and_weights_load(tmp_path, fake_flowers_session, monkeypatch):
    name = "tiny-weighted"
    spec = BackboneSpec(
        name=name,
        family="torchvision",
        head_attribute="fc",
        feature_dim=32,
        preprocessing=backbones.get_backbone("tiny-resnet").preprocessing,
        weights=WeightsSource("tiny-weighted.pth", None, None, None),
        description="test",
    )
    monkeypatch.setitem(backbones._REGISTRY, name, (spec, TinyResNet))
    path = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(TinyResNet().state_dict(), path)
    settings = (f'features.backbones=["{name}"]', f'weights.{name}="{path}"')
    graph, _ = graph_for(make_tiny_config(fake_flowers_session, tmp_path / "cache", settings))
    unit = graph.unit("features", name)
    assert unit.settings["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    graph.run("features")
    first = features_h5.read_group(features_h5.features_file(graph.directory(unit)), "val")["features"]
    torch.manual_seed(2)
    torch.save(TinyResNet().state_dict(), path)
    again, _ = graph_for(make_tiny_config(fake_flowers_session, tmp_path / "cache", settings))
    assert again.unit("features", name).key != unit.key
    again.run("features")
    second = features_h5.read_group(features_h5.features_file(again.directory(unit)), "val")["features"]
    assert not numpy.allclose(first, second)  # the new weights were loaded, not a random init
    missing = (f'features.backbones=["{name}"]', f'weights.{name}="{tmp_path / "absent.pth"}"')
    with pytest.raises(WeightsUnavailableError, match="absent.pth"):
        Graph(make_tiny_config(fake_flowers_session, tmp_path / "cache", missing)).units("features")
