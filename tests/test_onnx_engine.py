"""`[runtime] engine = "onnxruntime"`: frozen backbones run by onnxruntime, equal to torch's to rounding.

Needs the [onnx] extra (`make install` has it); without it these tests skip and say so.
"""

from __future__ import annotations

import numpy
import pytest
import torch
from helpers import make_tiny_config

from pipeline import calibration, features_h5, frozen, onnx_engine, predict
from pipeline.graph import Graph

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="the [onnx] extra is not installed: pip install -e '.[onnx]'")
pytestmark = pytest.mark.usefixtures("one_thread")

ONE_BACKBONE = ('features.backbones=["tiny-resnet"]', 'heads.kinds=["logistic"]')


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-efficientnet"])
def test_onnxruntime_gives_torch_features_to_rounding_whatever_the_batch_and_threads(name):
    torch.manual_seed(0)
    model = frozen.load_frozen_backbone(name, None, "cpu", channels_last=False, fold_batchnorm=True)
    torch.manual_seed(0)
    engine = frozen.load_frozen_backbone(name, None, "cpu", False, True, "onnxruntime", 32)
    assert isinstance(engine, onnx_engine.OnnxBackbone)
    images = torch.randn(12, 3, 32, 32)
    with torch.inference_mode():
        want = model(images).numpy()
        whole = engine(images).numpy()
        pieces = numpy.concatenate([engine(images[start : start + 5]).numpy() for start in range(0, 12, 5)])
        torch.set_num_threads(2)
        two_threads = engine(images.contiguous(memory_format=torch.channels_last)).numpy()
    numpy.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-5)
    numpy.testing.assert_array_equal(pieces, whole)  # resumed or streamed batches give the same bits
    numpy.testing.assert_array_equal(two_threads, whole)
    assert set(engine._sessions) == {1, 2}  # one session per thread count, as extraction streams ask
    with pytest.raises(ValueError, match="takes 32 px images"):
        engine(torch.zeros(1, 3, 40, 40))


def test_real_measurement_times_onnxruntime_beside_torch(tmp_path):
    config = make_tiny_config(tmp_path / "data", tmp_path / "cache", ONE_BACKBONE)
    workload = calibration.features_workload(config, "tiny-resnet", tmp_path / "cache")
    rates = calibration.measure_rates(workload, ("fp32", "onnxruntime"))
    assert set(rates) == {"fp32", "onnxruntime"} and min(rates.values()) > 0


def test_features_stage_keys_records_and_predicts_with_the_engine(tmp_path, fake_flowers_session, monkeypatch):
    def study(engine: str, cache: str):
        config = make_tiny_config(fake_flowers_session, tmp_path / cache, (*ONE_BACKBONE, f'runtime.engine="{engine}"'))
        graph = Graph(config, log=lambda line: None)
        graph.run("heads")
        path = features_h5.features_file(graph.directory(graph.unit("features", "tiny-resnet")))
        return config, graph, path

    config, graph, path = study("onnxruntime", "onnx")
    _, torch_graph, torch_path = study("torch", "torch")
    unit = graph.unit("features", "tiny-resnet")
    assert (
        unit.settings["engine"] == "onnxruntime"
        and "engine" not in torch_graph.unit("features", "tiny-resnet").settings
    )
    assert unit.key != torch_graph.unit("features", "tiny-resnet").key
    attributes = features_h5.read_attributes(path)
    assert attributes["engine"] == "onnxruntime" and attributes["onnxruntime_version"] == onnx_engine.version()
    assert features_h5.read_attributes(torch_path)["engine"] == "torch"
    for split in ("train", "val", "test"):
        numpy.testing.assert_allclose(
            features_h5.read_group(path, split)["features"],
            features_h5.read_group(torch_path, split)["features"],
            rtol=1e-4,
            atol=1e-5,
        )
    # predict runs the engine its features were extracted with, whatever the config says now.
    forward, images_seen = onnx_engine.OnnxBackbone.forward, []
    monkeypatch.setattr(
        onnx_engine.OnnxBackbone,
        "forward",
        lambda self, images: images_seen.append(len(images)) or forward(self, images),
    )
    test_paths = [str(p) for p in sorted((fake_flowers_session / "flowers-102" / "jpg").iterdir())[:4]]
    output = predict.predict(config, test_paths, "frozen-tiny-resnet-logistic")
    assert len(output["predictions"]) == 4 and sum(images_seen) == 4


def test_engine_onnxruntime_without_the_packages_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(onnx_engine, "available", lambda: False)
    with pytest.raises(onnx_engine.ConfigError, match=r"needs the onnxruntime and onnx packages: pip install"):
        onnx_engine.OnnxBackbone(torch.nn.Identity(), 8)
