"""Models of the end-to-end arms: the scratch CNNs and the fine-tuning construction path.

Methods are data here: fine-tuning = a registered backbone, pretrained, head replaced, two parameter
groups (head at lr, body at lr x multiplier); scratch = one of the CNNs below, one group. The speed
rewrites the stages apply to these networks on CPUs live in cpu_rewrites.py.
"""

from __future__ import annotations

from torch import nn

from .backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Preprocessing,
    body_parameters,
    build_backbone,
    freeze_leading_stages,
    get_backbone,
    head_parameters,
)
from .errors import PipelineError
from .training_settings import CnnConfig

ARCHITECTURES = ("bn-cnn", "notebook")
# The notebook trained at 224 px (resize 256, center crop 224) with ImageNet statistics.
SCRATCH_PREPROCESSING = Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


class ModelError(PipelineError, ValueError):
    """An architecture that cannot be built as configured."""


def conv_bn_relu(in_channels: int, out_channels: int, padding: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class BatchNormCNN(nn.Module):
    """Stages of conv-BN-ReLU (3x3, same padding) separated by 2x max-pooling, then global average pooling.

    Pooling globally keeps the classifier at widths[-1] x num_classes weights whatever the input size,
    where the notebook's flatten put 177 M weights into one fully connected layer.
    """

    def __init__(self, widths: list[int], convs_per_stage: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += conv_bn_relu(channels, width)
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        return self.classifier(self.dropout(self.pool(self.features(images)).flatten(1)))


class NotebookCNN(nn.Module):
    """The notebook's CNN as reconstructed from its one documented fact, kept for comparison.

    What is known: at 224 px its flatten fed a fully connected layer of about 177 M parameters.
    Three blocks of unpadded 3x3 conv -> BN -> ReLU -> 2x max-pool with 32, 64, 128 channels give
    224 -> 222 -> 111 -> 109 -> 54 -> 52 -> 26, so the flatten has 128 x 26 x 26 = 86,528 values, and
    a 2048-unit hidden layer on it has 86,528 x 2048 + 2048 = 177,211,392 parameters; then a
    2048 -> num_classes classifier. (Other factorisations of ~177 M, e.g. 64 channels into 4096
    units, fit too; this is the conventional 32-64-128 ladder.) About 177.5 M parameters in all.
    """

    def __init__(
        self, num_classes: int, input_size: int = 224, dropout: float = 0.0, widths=(32, 64, 128), hidden: int = 2048
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = 3, input_size
        for width in widths:
            layers += conv_bn_relu(channels, width, padding=0) + [nn.MaxPool2d(2)]
            channels, side = width, (side - 2) // 2
        if side < 1:
            raise ModelError(f"the notebook CNN needs inputs of at least 22 px, got {input_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images):
        return self.classifier(self.features(images))


def build_scratch_model(settings: CnnConfig, num_classes: int, input_size: int) -> nn.Module:
    """The configured scratch architecture, randomly initialised."""
    if settings.architecture == "notebook":
        return NotebookCNN(num_classes, input_size, settings.dropout)
    if settings.architecture == "bn-cnn":
        return BatchNormCNN(list(settings.widths), settings.convs_per_stage, num_classes, settings.dropout)
    raise ModelError(f"unknown architecture {settings.architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")


def build_finetune_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights_path: str | None = None,
    allow_download: bool = True,
    frozen_stages: int = 0,
) -> tuple[nn.Module, BackboneSpec]:
    """A registered backbone with its pretrained weights (when it has any) and a fresh num_classes head.

    The head is replaced at the registry's `head_attribute` (`_fc` for EfficientNet), so no
    1000-way ImageNet layer survives, used or not. With `frozen_stages` ([finetune] frozen_stages),
    the stem and that many leading stages get no gradient.
    """
    spec = get_backbone(name)
    model = build_backbone(
        name,
        pretrained=pretrained and spec.weights is not None,
        weights_path=weights_path,
        num_classes=num_classes,
        allow_download=allow_download,
    )
    freeze_leading_stages(model, spec, frozen_stages)
    return model, spec


def finetune_groups(model: nn.Module, spec: BackboneSpec, backbone_lr_multiplier: float) -> list[dict]:
    """Optimizer groups for fine-tuning: the new head at the full LR, the pretrained body at LR x multiplier.

    Frozen parameters ([finetune] frozen_stages) stay out: no step, no weight decay, no optimizer state.
    """
    body = [parameter for parameter in body_parameters(model, spec) if parameter.requires_grad]
    return [
        {"name": "head", "params": head_parameters(model, spec), "lr_scale": 1.0},
        {"name": "backbone", "params": body, "lr_scale": backbone_lr_multiplier},
    ]
