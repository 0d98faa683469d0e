"""The one training loop: it learns, resumes exactly, schedules LRs, keeps BN frozen, runs in bf16 on CPU.

Everything here runs on random tensors and tiny models (no dataset, no stage), on CPU, in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import numpy
import pytest
import torch
from torch import nn

from pipeline import checkpoints, cpu_rewrites, images, optimization, train
from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from pipeline.models import BatchNormCNN
from pipeline.runtime import Runtime
from pipeline.training_settings import TrainConfig

PREPROCESSING = Preprocessing(16, 16, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
TIMING_FIELDS = {"train_seconds", "val_seconds", "seconds", "images_per_second"}


pytestmark = pytest.mark.usefixtures("one_thread")


def runtime(precision: str = "fp32", seed: int = 0) -> Runtime:
    return Runtime(device="cpu", precision=precision, channels_last=True, num_workers=0, seed=seed)


def image_set(count: int = 12, classes: int = 3, side: int = 16, seed: int = 0) -> images.ImageSet:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (count, side, side, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % classes
    return images.ImageSet(rows, labels, PREPROCESSING, squares=rows)


def settings(**changes) -> TrainConfig:
    base = {
        "epochs": 4,
        "batch_size": 4,
        "optimizer": "adamw",
        "lr": 1e-2,
        "weight_decay": 1e-4,
        "warmup_epochs": 0.5,
        "label_smoothing": 0.0,
        "augmentation": "none",
        "minimum_crop_scale": 0.5,
    }
    return TrainConfig(**{**base, **changes})


def tiny_model(classes: int = 3, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return BatchNormCNN([8, 16], 1, classes, dropout)


def run(model, config, tmp_path, **options) -> train.FitResult:
    return train.fit(
        model,
        [{"name": "model", "params": list(model.parameters())}],
        options.pop("train_set", image_set()),
        options.pop("val_set", image_set(seed=1)),
        config,
        options.pop("runtime", runtime()),
        train.FitJob(
            checkpoint=tmp_path / checkpoints.CHECKPOINT,
            key=options.pop("key", "key-a"),
            label="test",
            log=options.pop("log", lambda line: None),
            **options,
        ),
    )


def without_timing(history: list) -> list:
    return [{name: value for name, value in row.items() if name not in TIMING_FIELDS} for row in history]


@pytest.mark.slow
def test_loop_overfits_a_tiny_set(tmp_path):
    data = image_set(count=12)
    config = settings(epochs=30, lr=2e-2, schedule="constant", warmup_epochs=0)
    result = run(tiny_model(), config, tmp_path, train_set=data, val_set=data)
    assert result.history[-1]["train_top1"] == 1.0
    assert result.best_val_top1 == 1.0
    assert result.history[-1]["train_loss"] < 0.2 * result.history[0]["train_loss"]
    assert (tmp_path / checkpoints.HISTORY_JSON).is_file() and (tmp_path / checkpoints.HISTORY_CSV).read_text().count(
        "\n"
    ) == 31


@pytest.mark.parametrize(
    "optimizer,augmentation,ema_decay", [("adamw", "trivialaugment", 0.9), ("sgd", "crop-flip", 0.0)]
)
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path, optimizer, augmentation, ema_decay):
    config = settings(epochs=4, optimizer=optimizer, augmentation=augmentation, ema_decay=ema_decay, lr=5e-3)
    straight = run(tiny_model(dropout=0.3), config, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_second_epoch(row):
        if row["epoch"] == 2:
            raise Killed

    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        run(tiny_model(dropout=0.3), config, broken, on_epoch_end=kill_after_second_epoch)
    lines = []
    checkpoint = checkpoints.read_checkpoint(broken / checkpoints.CHECKPOINT, "key-a", lines.append)
    assert checkpoint["epoch"] == 2
    # A fresh process would build a fresh model: start from other weights to prove they are restored.
    restarted = tiny_model(dropout=0.3)
    nn.init.zeros_(restarted.classifier.weight)
    resumed = run(restarted, config, broken, resume=checkpoint, log=lines.append)
    assert any("resuming after epoch 2/4" in line for line in lines)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 4
    assert without_timing(resumed.history) == without_timing(straight.history)
    assert resumed.best_epoch == straight.best_epoch
    for name, tensor in straight.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name
    for name, tensor in straight_model_state(tmp_path / "straight").items():
        assert torch.equal(tensor, restarted.state_dict()[name]), name


def straight_model_state(directory) -> dict:
    return checkpoints.load_checkpoint(directory / checkpoints.CHECKPOINT)["model"]


def test_checkpoint_for_other_settings_is_not_resumed(tmp_path):
    run(tiny_model(), settings(epochs=1), tmp_path, key="key-a")
    lines = []
    assert checkpoints.read_checkpoint(tmp_path / checkpoints.CHECKPOINT, "key-b", lines.append) is None
    assert "other settings" in lines[0]
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    assert checkpoints.read_checkpoint(tmp_path / "torn.pt", "key-a", lines.append) is None
    assert checkpoints.read_checkpoint(tmp_path / "absent.pt", "key-a", lines.append) is None


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    # LR 0 and BN statistics frozen: val never changes after epoch 1, so patience 2 stops after epoch 3.
    config = settings(epochs=10, patience=2, lr=0.0)
    result = run(tiny_model(), config, tmp_path, freeze_batchnorm=True)
    assert result.epochs_run == 3 and result.stopped_early and result.best_epoch == 1
    again = run(
        tiny_model(),
        config,
        tmp_path,
        freeze_batchnorm=True,
        resume=checkpoints.read_checkpoint(tmp_path / checkpoints.CHECKPOINT, "key-a"),
    )
    assert again.epochs_run == 3 and len(again.history) == 3  # a finished run is not extended


def test_validating_every_third_epoch_selects_only_evaluated_epochs(tmp_path):
    config = settings(epochs=7, validate_every=3)
    lines = []
    result = run(tiny_model(), config, tmp_path, log=lines.append)
    evaluated = [row["epoch"] for row in result.history if row["val_top1"] is not None]
    assert evaluated == [3, 6, 7]  # every third, and always the last
    assert result.epochs_run == 7 and result.best_epoch in evaluated
    assert all(row["val_loss"] is None for row in result.history if row["epoch"] not in evaluated)
    assert sum("val not evaluated" in line for line in lines) == 4
    # The same training pass as validating every epoch: only what is evaluated (and so selectable) differs.
    every = run(tiny_model(), settings(epochs=7), tmp_path / "every")
    for row, other in zip(result.history, every.history, strict=True):
        assert row["train_loss"] == other["train_loss"]
        if row["val_top1"] is not None:
            assert row["val_top1"] == other["val_top1"]
    # The history files hold the skipped epochs as empty values, which the report's plot leaves out.
    saved = json.loads((tmp_path / checkpoints.HISTORY_JSON).read_text())
    assert saved[0]["val_top1"] is None and saved[2]["val_top1"] is not None
    assert (tmp_path / checkpoints.HISTORY_CSV).read_text().splitlines()[1].count(",,") == 1


def test_patience_counts_evaluations_not_epochs(tmp_path):
    # LR 0, BN frozen: val never improves after the first evaluation (epoch 2), so patience 2 stops at epoch 6.
    config = settings(epochs=12, validate_every=2, patience=2, lr=0.0)
    result = run(tiny_model(), config, tmp_path, freeze_batchnorm=True)
    assert result.best_epoch == 2 and result.epochs_run == 6 and result.stopped_early


def test_bf16_autocast_runs_on_cpu(tmp_path):
    model = tiny_model()
    seen = []
    model.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    result = run(model, settings(epochs=1), tmp_path, runtime=runtime("bf16"))
    assert torch.bfloat16 in seen
    assert math.isfinite(result.history[0]["train_loss"]) and math.isfinite(result.history[0]["val_loss"])
    assert all(tensor.dtype == torch.float32 for tensor in result.best_state.values() if tensor.is_floating_point())


def test_frozen_batchnorm_statistics_do_not_move(tmp_path):
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if "running" in name}
    run(model, settings(epochs=1), tmp_path, freeze_batchnorm=True)
    after = model.state_dict()
    assert all(torch.equal(tensor, after[name]) for name, tensor in before.items())
    moving = tiny_model()
    run(moving, settings(epochs=1), tmp_path / "moving")
    assert not torch.equal(moving.state_dict()["features.1.running_mean"], before["features.1.running_mean"])


def test_optimizer_groups_scale_lr_and_skip_decay_on_norms_and_biases():
    model = tiny_model()
    head = list(model.classifier.parameters())
    body = [parameter for parameter in model.parameters() if all(parameter is not other for other in head)]
    optimizer = optimization.make_optimizer(
        [{"name": "head", "params": head, "lr_scale": 1.0}, {"name": "backbone", "params": body, "lr_scale": 0.1}],
        settings(lr=1e-3, weight_decay=0.05),
    )
    for group in optimizer.param_groups:
        expected_lr = 1e-3 if group["name"] == "head" else 1e-4
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim > 1 else 0.0)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


def test_learning_rate_schedules():
    steps = 10
    cosine = settings(epochs=5, schedule="cosine", warmup_epochs=1)
    factors = [optimization.lr_factor(step, steps, cosine) for step in range(50)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] < 0.01 and all(later <= earlier for earlier, later in itertools.pairwise(factors[9:]))
    stepped = settings(epochs=20, schedule="step", step_size=7, step_gamma=0.1, warmup_epochs=0)
    assert [optimization.lr_factor(epoch * steps, steps, stepped) for epoch in (0, 6, 7, 14)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01]
    )
    onecycle = settings(epochs=5, schedule="onecycle", warmup_epochs=1)
    assert optimization.lr_factor(0, steps, onecycle) < 0.1 and optimization.lr_factor(
        9, steps, onecycle
    ) == pytest.approx(1.0)
    assert optimization.lr_factor(49, steps, onecycle) < 0.01


def test_augmented_crops_stay_inside_the_image_and_flip_both_ways():
    theta = images.random_crop_affines(2000, 0.35, torch.Generator().manual_seed(0))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert torch.all(theta[:, 0, 2].abs() <= 1 - width + 1e-6) and torch.all(theta[:, 1, 2].abs() <= 1 - height + 1e-6)
    assert torch.all(width * height >= 0.35 - 1e-6) and torch.all(width <= 1) and torch.all(height <= 1)
    assert 0.4 < float((theta[:, 0, 0] < 0).float().mean()) < 0.6
    data = image_set(count=4, side=16)
    batch = data.train_batch(torch.arange(4), "trivialaugment", 0.35, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32


def test_image_cache_is_decoded_once_and_read_a_batch_at_a_time(tmp_path, fake_flowers_session, monkeypatch):
    from pipeline import data
    from pipeline.config import DataConfig

    index = data.verify(
        data.dataset_folder(fake_flowers_session),
        dataclasses.replace(
            DataConfig(), check_md5=False, num_classes=6, expected_images=84, expected_split_sizes=[24, 24, 36]
        ),
    )
    first = images.load_image_sets(index, tmp_path, 20, PREPROCESSING, 12, log=lambda line: None)
    assert first["val"].rows.shape == (24, 12, 12, 3) and first["train"].squares.shape == (24, 20, 20, 3)
    assert first["val"].squares is None
    whole = numpy.load(first["val"].rows.path)
    positions = torch.tensor([5, 6, 7, 0, 23, 2, 3])  # runs and single rows, out of order
    assert torch.equal(first["val"].rows[positions], torch.from_numpy(whole[positions.numpy()]))
    with pytest.raises(IndexError):
        first["val"].rows[torch.tensor([24])]

    def refuse(*args):
        raise AssertionError("decoded an image again")

    monkeypatch.setattr(images.pixels, "load_pixels", refuse)
    again = images.load_image_sets(index, tmp_path, 20, PREPROCESSING, 12, log=lambda line: None)
    for split in ("train", "val", "test"):
        assert numpy.array_equal(numpy.load(again[split].rows.path), numpy.load(first[split].rows.path))


def test_random_crops_are_uint8_pixels_normalised_like_eval_ones():
    data = image_set(count=4, side=16)
    batch = data.train_batch(torch.arange(4), "crop-flip", 0.35, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(PREPROCESSING.mean).view(1, 3, 1, 1), torch.tensor(PREPROCESSING.std).view(1, 3, 1, 1)
    levels = (batch * std + mean) * 255
    assert batch.shape == (4, 3, 16, 16) and torch.allclose(levels, levels.round(), atol=1e-3)
    flipped = data.train_batch(torch.arange(4), "flip", 0.35, torch.Generator().manual_seed(0))
    plain = data.eval_batch(torch.arange(4))
    assert all(torch.equal(one, two) or torch.equal(one, two.flip(-1)) for one, two in zip(flipped, plain, strict=True))


class DepthwiseNet(nn.Module):
    """A tiny MobileNet-style block: pointwise, depthwise (groups = channels), pooled head."""

    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs):
        return self.head(self.depthwise(self.pointwise(inputs)).mean((2, 3)))


def test_depthwise_layers_train_in_float32_but_infer_in_bf16():
    from pipeline.cpu_rewrites import train_depthwise_in_float32

    torch.manual_seed(0)
    plain, swapped = DepthwiseNet(), DepthwiseNet()
    swapped.load_state_dict(plain.state_dict())
    keys = list(swapped.state_dict())
    assert train_depthwise_in_float32(swapped) == 1
    assert train_depthwise_in_float32(swapped) == 0  # idempotent: already swapped
    assert list(swapped.state_dict()) == keys and isinstance(swapped.depthwise, nn.Conv2d)
    inputs = torch.randn(4, 3, 8, 8)
    seen = {}
    swapped.depthwise.register_forward_hook(lambda module, args, output: seen.update(dtype=output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        swapped(inputs).float().sum().backward()
    assert seen["dtype"] == torch.float32 and swapped.depthwise.weight.grad.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # No gradients: the bf16 path, bit for bit what the unswapped model computes.
        assert torch.equal(swapped(inputs), plain(inputs)) and seen["dtype"] == torch.bfloat16
    copied = copy.deepcopy(swapped)  # the EMA copies the model
    assert type(copied.depthwise) is type(swapped.depthwise)


def test_runtime_keeps_depthwise_float32_only_for_cpu_bf16():
    from pipeline.config import RuntimeConfig
    from pipeline.runtime import resolve_runtime

    assert resolve_runtime(RuntimeConfig(device="cpu", precision="bf16")).float32_depthwise
    assert not resolve_runtime(RuntimeConfig(device="cpu", precision="fp32")).float32_depthwise
    assert not resolve_runtime(RuntimeConfig(device="cpu", precision="bf16", float32_depthwise=False)).float32_depthwise
    assert resolve_runtime(RuntimeConfig(device="cpu")).inference_streams == min(torch.get_num_threads(), 4)
    assert resolve_runtime(RuntimeConfig(device="cpu", inference_streams=3)).inference_streams == 3
    model = cpu_rewrites.for_training(runtime("bf16").place(DepthwiseNet()), runtime("bf16"), settings(), "net")
    assert type(model.depthwise).__name__ == "Conv2d"  # the field defaults to off
    depthwise = dataclasses.replace(runtime("bf16"), float32_depthwise=True)
    model = depthwise.place(DepthwiseNet())
    assert type(model.depthwise) is nn.Conv2d  # placing moves the model and changes nothing else
    assert model.pointwise.weight.is_contiguous(memory_format=torch.channels_last)
    model = cpu_rewrites.for_training(model, depthwise, settings(), "net")
    assert type(model.depthwise).__name__ == "Float32TrainingConv2d"


ALLOCATION_PROBE = """
import resource, sys, torch
from pipeline.config import RuntimeConfig
from pipeline.runtime import environment, resolve_runtime
resolve_runtime(RuntimeConfig(device="cpu", keep_freed_memory=sys.argv[1] == "on"))
torch.set_num_threads(1)
convolution = torch.nn.Conv2d
layers = torch.nn.Sequential(convolution(3, 32, 3, padding=1), torch.nn.ReLU(), convolution(32, 32, 3, padding=1))
inputs = torch.randn(4, 3, 256, 256)    # 34 MB activations: above glibc's largest adaptive mmap threshold
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        layers(inputs)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(environment()["freed_memory_kept"], *[faults() for _ in range(6)])
"""


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc malloc")
def test_kept_freed_memory_stops_page_faulting_every_pass():
    import subprocess
    import sys
    from pathlib import Path

    project = Path(__file__).resolve().parents[1]

    def probe(setting):
        output = subprocess.run(
            [sys.executable, "-c", ALLOCATION_PROBE, setting], cwd=project, check=True, capture_output=True, text=True
        ).stdout.split()
        return output[0], [int(value) for value in output[1:]]

    kept, on = probe("on")
    default, off = probe("off")
    assert (kept, default) == ("True", "False")
    # Once warm, passes reuse the pages of earlier ones; glibc's default maps and faults them in again each time.
    assert sum(on[3:]) < 0.1 * sum(off[3:]) and min(off[3:]) > 0.5 * on[0]


class FoldableNet(nn.Module):
    """conv -> BN -> ReLU, a depthwise conv -> BN, and a biased conv -> BN, then a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 6, 1)
        self.project_norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)
        generator = torch.Generator().manual_seed(1)
        for norm in (self.stem_norm, self.depthwise_norm, self.project_norm):
            # Statistics and affine pairs far from their defaults, so a wrong fold shows.
            norm.running_mean.normal_(0, 1, generator=generator)
            norm.running_var.uniform_(0.2, 3, generator=generator)
            norm.weight.data.uniform_(0.5, 2, generator=generator)
            norm.bias.data.normal_(0, 1, generator=generator)

    def forward(self, inputs):
        hidden = torch.relu(self.stem_norm(self.stem(inputs)))
        hidden = self.project_norm(self.project(self.depthwise_norm(self.depthwise(hidden))))
        return self.head(hidden.mean((2, 3)))


def test_frozen_batchnorm_folded_for_training_keeps_outputs_and_gradients():
    from pipeline.cpu_rewrites import fold_for_training

    plain = FoldableNet().double()
    folded = fold_for_training(copy.deepcopy(plain), "foldable")
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert all("frozen_norm" in module.__dict__ for module in (folded.stem, folded.depthwise, folded.project))
    inputs = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for model in (plain, folded):
        train.set_train_mode(model, freeze_batchnorm=True)
        torch.nn.functional.cross_entropy(model(inputs), torch.tensor([0, 1, 2, 0])).backward()
    for (name, parameter), reference in zip(folded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-10, atol=1e-12, msg=name)
    # A norm back in train mode normalises by itself again (batch statistics, running ones updated).
    train.set_train_mode(plain, freeze_batchnorm=False)
    train.set_train_mode(folded, freeze_batchnorm=False)
    torch.testing.assert_close(folded(inputs), plain(inputs))
    torch.testing.assert_close(folded.stem_norm.running_mean, plain.stem_norm.running_mean)
    average = copy.deepcopy(folded)  # the EMA copies the model
    assert average.stem.__dict__["frozen_norm"] is average.stem_norm


def test_training_fold_composes_with_float32_depthwise_under_autocast():
    from pipeline.cpu_rewrites import fold_for_training, train_depthwise_in_float32

    plain = FoldableNet()
    folded = fold_for_training(copy.deepcopy(plain), "foldable")
    assert train_depthwise_in_float32(folded) == 1
    seen = {}
    folded.depthwise.register_forward_hook(lambda module, args, output: seen.update(dtype=output.dtype))
    train.set_train_mode(folded, freeze_batchnorm=True)
    train.set_train_mode(plain, freeze_batchnorm=True)
    inputs = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded(inputs).float().sum().backward()
    assert seen["dtype"] == torch.float32 and folded.depthwise.weight.grad.dtype == torch.float32
    assert folded.depthwise_norm.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(inputs), plain(inputs), rtol=1e-5, atol=1e-5)


def test_training_fold_refuses_a_network_whose_registration_order_misleads():
    from pipeline.cpu_rewrites import fold_for_training
    from pipeline.models import ModelError

    class Misordered(FoldableNet):
        def forward(self, inputs):  # stem_norm, registered right after stem, normalises depthwise
            hidden = torch.relu(self.stem(inputs))
            hidden = self.stem_norm(self.depthwise(hidden))
            return self.head(self.project(hidden).mean((2, 3)))

    with pytest.raises(ModelError, match=r"\[finetune\] fold_batchnorm = false"):
        fold_for_training(Misordered(), "misordered")


def test_finetune_rewrite_folds_only_frozen_statistics_and_only_when_asked(tiny_config):
    from pipeline.cpu_rewrites import rewrite_for_finetuning

    settings = tiny_config.finetune
    for freeze, fold, expected in ((True, True, True), (True, False, False), (False, True, False)):
        model = rewrite_for_finetuning(
            FoldableNet(), "foldable", dataclasses.replace(settings, freeze_bn_stats=freeze, fold_batchnorm=fold)
        )
        assert ("frozen_norm" in model.stem.__dict__) is expected


def test_finetune_rewrite_of_an_efficientnet_keeps_its_gradients(tiny_config):
    """Padding moved inside and frozen BatchNorm folded: in fp64 the same loss gradients, parameter by parameter."""
    from pipeline.cpu_rewrites import rewrite_for_finetuning
    from pipeline.models import build_finetune_model

    plain, _ = build_finetune_model("tiny-efficientnet", 5, pretrained=False)
    generator = torch.Generator().manual_seed(1)
    for module in plain.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    plain = plain.double()
    rewritten = rewrite_for_finetuning(
        copy.deepcopy(plain),
        "tiny-efficientnet",
        dataclasses.replace(tiny_config.finetune, freeze_bn_stats=True, fold_batchnorm=True),
    )
    assert any(
        isinstance(getattr(module, "static_padding", None), nn.Identity) and module.padding != (0, 0)
        for module in rewritten.modules()
    )
    inputs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for model in (plain, rewritten):
        train.set_train_mode(model, freeze_batchnorm=True)
        torch.manual_seed(2)  # the same drop-connect draws on both sides
        torch.nn.functional.cross_entropy(model(inputs), torch.tensor([0, 3, 4])).backward()
    for (name, parameter), reference in zip(rewritten.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-9, atol=1e-12, msg=name)
