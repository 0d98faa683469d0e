"""The end-to-end training sections of the study config ([finetune] and [cnn] share TrainConfig), kept
apart from pipeline/config.py so each stays short; config.Config holds them like every other section."""

from __future__ import annotations

from dataclasses import dataclass

from .settings import setting, without_neutral_defaults

AUGMENTATIONS = ("none", "flip", "crop-flip", "trivialaugment", "randaugment")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every end-to-end arm (fine-tuning and the scratch CNN)."""

    epochs: int = setting(30, "Maximum epochs.", minimum=1)
    batch_size: int = setting(32, "Images per training step.", minimum=1)
    optimizer: str = setting("sgd", "Optimizer.", choices=OPTIMIZERS)
    lr: float = setting(
        0.01, "Peak learning rate of the head (and of the whole model when training from scratch).", minimum=0
    )
    momentum: float = setting(0.9, "SGD momentum.", minimum=0, maximum=1)
    weight_decay: float = setting(5e-4, "Weight decay.", minimum=0)
    schedule: str = setting(
        "cosine", "Learning-rate schedule (step replicates the notebook: StepLR).", choices=SCHEDULES
    )
    warmup_epochs: float = setting(
        1.0, "Warmup length in epochs (linear from 0; onecycle: cosine up from lr/25).", minimum=0
    )
    step_size: int = setting(7, "StepLR period in epochs (schedule = step).", minimum=1)
    step_gamma: float = setting(0.1, "StepLR decay factor (schedule = step).", minimum=0, maximum=1)
    label_smoothing: float = setting(0.1, "Label smoothing of the cross-entropy loss.", minimum=0, maximum=1)
    augmentation: str = setting("crop-flip", "Training augmentation.", choices=AUGMENTATIONS)
    patience: int = setting(
        0, "Stop after this many val evaluations without a better val accuracy; 0 never stops early.", minimum=0
    )
    validate_every: int = setting(
        1,
        "Evaluate on val every this many epochs, and always after the last; only evaluated epochs can be "
        "selected. On Flowers-102 (as many val as train images) a val pass is a large share of a CPU epoch.",
        minimum=1,
    )
    input_size: int = setting(0, "Input crop in pixels; 0 uses the backbone's native size.", minimum=0)
    minimum_crop_scale: float = setting(
        0.35, "Smallest image area a random-resized crop keeps (crop-flip and policies).", minimum=0.01, maximum=1
    )
    stored_size: int = setting(
        0,
        "Side of the square uint8 training images random crops are cut from, decoded once; 0 = the "
        "eval resize size (e.g. 256 for a 224 crop). Smaller, such as 64 for 64 px thumbnails, is "
        "upscaled per batch. Eval pixels are always the backbone's eval crop at input_size.",
        minimum=0,
    )
    ema_decay: float = setting(
        0.0,
        "Validate, select and test an exponential moving average of the weights with this per-step decay; 0 = off.",
        minimum=0,
        maximum=1,
    )


# Settings whose default leaves every bit as before they existed (settings.without_neutral_defaults).
KEY_NEUTRAL_DEFAULTS = {"validate_every": 1, "frozen_stages": 0}


def keyed_section(section: dict) -> dict:
    """A [finetune] or [cnn] section as it enters a cache key: key-neutral settings at their default left out."""
    return without_neutral_defaults(section, KEY_NEUTRAL_DEFAULTS)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    backbones: list = setting(["resnet18", "efficientnet-b5"], "Pretrained backbones fine-tuned end to end.")
    backbone_lr_multiplier: float = setting(0.1, "Backbone learning rate = lr x this.", minimum=0)
    freeze_bn_stats: bool = setting(False, "Keep BatchNorm running statistics fixed while fine-tuning.")
    fold_batchnorm: bool = setting(
        True,
        "Rewrite the convolutions for training, keeping the function: equal-sided "
        "padding moves inside them and, with freeze_bn_stats, each frozen BatchNorm "
        "is computed by the convolution before it, saving a pass over the "
        "activations; rounding moves, so it is part of the key.",
    )
    frozen_stages: int = setting(
        0,
        "Keep the stem and this many leading stages of the pretrained body frozen (no gradient, no update, "
        "in eval mode); backward stops where they end, so each step costs less. Stages as each family "
        "defines them (EfficientNet block groups, ResNet layers); 0 trains everything.",
        minimum=0,
    )
    linear_probe: bool = setting(False, "Fit the new head on frozen features first (LP-FT), then fine-tune from it.")
    probe_weight_decays: list = setting(
        [1e-4, 1e-3, 1e-2],
        "L2 strengths of the linear probe (full-batch L-BFGS); the best on val initialises the head.",
    )


@dataclass(frozen=True)
class CnnConfig(TrainConfig):
    architecture: str = setting(
        "bn-cnn",
        "bn-cnn (conv-BN-ReLU blocks, global pooling) or notebook (its exact net).",
        choices=("bn-cnn", "notebook"),
    )
    widths: list = setting([32, 64, 128, 256], "Channels of each conv-BN-ReLU stage (bn-cnn).")
    convs_per_stage: int = setting(2, "Conv-BN-ReLU layers per stage (bn-cnn).", minimum=1)
    dropout: float = setting(0.2, "Dropout before the classifier.", minimum=0, maximum=1)
