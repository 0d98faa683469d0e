"""`make predict`: top-k classes of new images from a frozen or end-to-end arm, and its one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from helpers import make_tiny_config

from pipeline import data, evaluate, features_h5, graph, images, predict, train
from pipeline.head_kinds import fitting
from pipeline.stages import download

FROZEN_ARMS = ("frozen-tiny-resnet-softmax", "frozen-tiny-resnet-logistic", "frozen-tiny-resnet-knn")
END_TO_END_ARMS = ("finetune-tiny-resnet", "scratch-bn-cnn")
ONE_BACKBONE = ('features.backbones=["tiny-resnet"]', 'heads.kinds=["softmax", "logistic", "knn"]')


@pytest.fixture(scope="module")
def study(tmp_path_factory, fake_flowers_session):
    """Every arm of the tiny study (one frozen backbone, every head kind, fine-tuning, scratch) built once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on shared cores
    config = make_tiny_config(fake_flowers_session, tmp_path_factory.mktemp("cache"), ONE_BACKBONE)
    runner = graph.Graph(config, log=lambda line: None)
    for stage in ("heads", "finetune", "cnn"):
        runner.run(stage)
    index = data.load_index(runner.directory(runner.unit("download", download.UNIT)))
    yield config, index
    torch.set_num_threads(threads)


def stage_test_predictions(config, arm: predict.Arm, index) -> numpy.ndarray:
    """Each test image's class as the arm's stage computed it at test time (not through predict's image path)."""
    study_graph = graph.Graph(config)
    if arm.method == "frozen":
        features_unit = study_graph.unit("heads", arm.unit).input("features")
        stored = features_h5.read_group(features_h5.features_file(study_graph.directory(features_unit)), "test")
        return fitting.load_head(arm.directory)(stored["features"])
    runtime = predict.resolve_runtime(config.runtime)
    model, preprocessing = predict.end_to_end_model(config, arm, runtime)
    folder = images.store_folder(config.cache.root, study_graph.unit("download", download.UNIT).key)
    test_set = images.load_image_sets(
        index, folder, arm.result["stored_size"], preprocessing, arm.result["input_size"], log=lambda line: None
    )["test"]
    return train.predict(model, test_set, runtime, 16).argmax(1).numpy()


@pytest.mark.parametrize("arm_name", FROZEN_ARMS + END_TO_END_ARMS)
def test_predictions_are_distributions_and_match_the_arms_test_evaluation(study, arm_name):
    config, index = study
    paths = index.paths("test")
    output = predict.predict(config, [str(path) for path in paths], arm_name, top=6)
    arm = predict.choose_arm(config, graph.Graph(config), arm_name)
    assert output["arm"] == arm_name and len(output["predictions"]) == len(paths)
    for path, prediction in zip(paths, output["predictions"], strict=True):
        assert prediction["path"] == str(path)
        probabilities = [entry["probability"] for entry in prediction["top"]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)  # all 6 classes shown
        assert probabilities == sorted(probabilities, reverse=True)
        assert {entry["class"] for entry in prediction["top"]} == set(index.class_names)
        assert all(index.class_names[entry["label"]] == entry["class"] for entry in prediction["top"])
    predicted = numpy.array([prediction["top"][0]["label"] for prediction in output["predictions"]])
    # Image by image, the class the stage gave each test image at test time...
    assert predicted.tolist() == stage_test_predictions(config, arm, index).tolist()
    # ...and so exactly the confusion matrix the arm reported.
    metrics = evaluate.classification_metrics(index.labels["test"], predicted, len(index.class_names))
    assert metrics["confusion_matrix"] == arm.result["confusion_matrix"]


def test_default_arm_is_the_best_on_val_and_text_output_has_five_lines_per_image(study, capsys):
    config, index = study
    _, trained = predict.trained_arms(config, graph.Graph(config))
    assert set(trained) == set(FROZEN_ARMS + END_TO_END_ARMS)
    best = max(trained.values(), key=lambda arm: arm.result["val_top1"])
    paths = [str(path) for path in index.paths("test")[:2]]
    arguments = ["--config", str(config.source), *sum((["--set", item] for item in overrides(config)), []), *paths]
    assert predict.main(arguments) == 0
    captured = capsys.readouterr()
    assert best.result["val_top1"] == max(arm.result["val_top1"] for arm in trained.values())
    assert f"arm {best.name} " in captured.err
    lines = captured.out.splitlines()
    assert len(lines) == 2 * 6 and lines[0] == paths[0] and lines[6] == paths[1]
    for line in lines[1:6] + lines[7:]:
        match = re.fullmatch(r"  (\d\.\d{3})  (.+)", line)
        assert match and match.group(2) in index.class_names
    assert predict.main(["--json", "--arm", "scratch-bn-cnn", *arguments]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["arm"] == "scratch-bn-cnn" and [p["path"] for p in output["predictions"]] == paths
    assert all(len(prediction["top"]) == 5 for prediction in output["predictions"])


def overrides(config) -> list[str]:
    """--set arguments that rebuild the study's config from its TOML file."""
    return [f'data.root="{config.data.root}"', f'cache.root="{config.cache.root}"', *ONE_BACKBONE]


def test_a_folder_predicts_each_image_in_name_order(study, tmp_path):
    config, index = study
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, path in enumerate(index.paths("test")[:3]):
        shutil.copy(path, folder / f"photo_{2 - number}.JPG")
    (folder / "notes.txt").write_text("not an image, and skipped by its suffix")
    output = predict.predict(config, [str(folder)], "frozen-tiny-resnet-logistic")
    assert [Path(p["path"]).name for p in output["predictions"]] == ["photo_0.JPG", "photo_1.JPG", "photo_2.JPG"]
    single = predict.predict(config, [str(folder / "photo_0.JPG")], "frozen-tiny-resnet-logistic")
    alone, in_batch = single["predictions"][0]["top"], output["predictions"][0]["top"]
    # Batch composition may move bf16 results in the last bits, never the classes.
    assert [entry["label"] for entry in alone] == [entry["label"] for entry in in_batch]
    assert [entry["probability"] for entry in alone] == pytest.approx(
        [entry["probability"] for entry in in_batch], abs=1e-3
    )


@pytest.mark.parametrize(
    "problem,message",
    [
        ("missing", "no such image file or folder"),
        ("not-an-image", "is not a readable image"),
        ("empty-folder", "holds no image files"),
        ("unknown-arm", "unknown arm 'frozen-resnet-18-svm'"),
        ("top", "--top must be at least 1"),
    ],
)
def test_bad_inputs_give_one_clear_error(study, tmp_path, problem, message):
    config, index = study
    image, arm, top = str(index.paths("test")[0]), None, 5
    if problem == "missing":
        image = str(tmp_path / "nowhere.jpg")
    elif problem == "not-an-image":
        (tmp_path / "fake.jpg").write_text("plain text")
        image = str(tmp_path / "fake.jpg")
    elif problem == "empty-folder":
        (tmp_path / "empty").mkdir()
        image = str(tmp_path / "empty")
    elif problem == "unknown-arm":
        arm = "frozen-resnet-18-svm"
    else:
        top = 0
    with pytest.raises(predict.PredictError, match=re.escape(message)) as caught:
        predict.predict(config, [image], arm, top)
    assert "\n" not in str(caught.value)
    if problem == "unknown-arm":
        assert "finetune-tiny-resnet" in str(caught.value) and "trained: " in str(caught.value)


def test_untrained_arms_are_named_with_what_to_run(fake_flowers_session, tmp_path, capsys):
    config = make_tiny_config(fake_flowers_session, tmp_path / "empty-cache", ONE_BACKBONE)
    image = str(next(Path(fake_flowers_session, "flowers-102", "jpg").iterdir()))
    with pytest.raises(predict.PredictError, match=r"arm finetune-tiny-resnet is not trained yet \(.*make finetune"):
        predict.predict(config, [image], "finetune-tiny-resnet")
    with pytest.raises(predict.PredictError, match="no arm is trained yet"):
        predict.predict(config, [image])
    arguments = [
        "--config",
        str(config.source),
        "--set",
        f'data.root="{config.data.root}"',
        "--set",
        f'cache.root="{config.cache.root}"',
        image,
    ]
    assert predict.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no arm is trained yet") and error.count("\n") == 1
