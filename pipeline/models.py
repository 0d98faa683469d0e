"""Models of the end-to-end arms: the scratch CNNs and the fine-tuning construction path.

Methods are data here: fine-tuning = a registered backbone, pretrained, head replaced, two parameter
groups (head at lr, body at lr x multiplier); scratch = one of the CNNs below, one group.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from .backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Preprocessing,
    body_parameters,
    build_backbone,
    get_backbone,
    head_parameters,
)
from .config import CnnConfig
from .errors import PipelineError

ARCHITECTURES = ("bn-cnn", "notebook")
# The notebook trained at 224 px (resize 256, center crop 224) with ImageNet statistics.
SCRATCH_PREPROCESSING = Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


class ModelError(PipelineError, ValueError):
    """An architecture that cannot be built as configured."""


# One fp32-training subclass per convolution class, so swapped modules of a class share a type.
_FLOAT32_TRAINING_CLASSES: dict[type, type] = {}


def _float32_training_class(base: type) -> type:
    """`base` whose forward leaves CPU autocast while its own weight is being trained."""
    if base not in _FLOAT32_TRAINING_CLASSES:

        def forward(self, input):
            if torch.is_grad_enabled() and self.weight.requires_grad and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return base.forward(self, input.float())
            return base.forward(self, input)

        _FLOAT32_TRAINING_CLASSES[base] = type(
            f"Float32Training{base.__name__}",
            (base,),
            {
                "forward": forward,
                "__module__": __name__,
                "__doc__": f"{base.__name__} trained in fp32 under CPU autocast.",
            },
        )
    return _FLOAT32_TRAINING_CLASSES[base]


def train_depthwise_in_float32(model: nn.Module) -> int:
    """Run every grouped convolution of `model` in fp32 while it trains under CPU bf16 autocast; returns how many.

    On CPUs with AMX the bf16 weight gradient of a depthwise convolution is several times slower than
    in fp32, which made bf16 fine-tuning slower than fp32; with these layers in fp32, a step beats both
    all-bf16 and all-fp32. Forward passes without gradients (extraction, evaluation) keep the faster bf16 path.
    The class is swapped in place, so parameter names, state_dict and checkpoints do not change.
    """
    swapped = 0
    already = set(_FLOAT32_TRAINING_CLASSES.values())
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and type(module) not in already:
            module.__class__ = _float32_training_class(type(module))
            swapped += 1
    return swapped


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d registered right before it in the same parent; returns how many.

    For frozen inference only (the statistics must be final): the convolution's weights and bias take
    the normalisation over, and the BatchNorm becomes an Identity. EfficientNet, EfficientNet-Lite and
    ResNet register every conv right before the norm that reads it; `fold_for_inference` checks the
    output against the unfolded model, so a network where that order lies is refused, not silently changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = list(_convolution_norm_pairs(model))
    for parent, first, second in pairs:
        parent._modules[first] = fuse_conv_bn_eval(parent._modules[first], parent._modules[second])
        parent._modules[second] = nn.Identity()
    return len(pairs)


def _convolution_norm_pairs(model: nn.Module):
    """(parent, conv name, norm name) for each Conv2d registered right before a matching BatchNorm2d."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for first, second in pairwise(names):
            convolution, norm = parent._modules[first], parent._modules[second]
            if (
                isinstance(convolution, nn.Conv2d)
                and type(norm) is nn.BatchNorm2d
                and norm.track_running_stats
                and norm.num_features == convolution.out_channels
            ):
                yield parent, first, second


def pad_inside_convolutions(model: nn.Module) -> int:
    """Let convolutions with an equal TensorFlow-"SAME" pad on every side pad internally; returns how many.

    EfficientNet's static-same-padding convolutions pad with a separate ZeroPad2d (a full copy of the
    activations) before a padding-free convolution; where the pad is the same on all four sides the
    convolution's own zero padding computes the same numbers (bf16 Lite0 features bit for bit).
    """
    moved = 0
    for module in model.modules():
        padding = getattr(module, "static_padding", None)
        if (
            isinstance(module, nn.Conv2d)
            and isinstance(padding, nn.ZeroPad2d)
            and len(set(padding.padding)) == 1
            and tuple(module.padding) == (0, 0)
        ):
            module.padding = (padding.padding[0],) * 2
            module.static_padding = nn.Identity()
            moved += 1
    return moved


def fold_for_inference(model: nn.Module, name: str) -> nn.Module:
    """A frozen (eval) `model` with BatchNorm folded and equal-sided padding moved into its convolutions.

    Checked on one random batch against the model as it came (`rewrite_checked`).
    """

    def rewrite(network: nn.Module) -> None:
        pad_inside_convolutions(network)
        fold_batchnorm(network)

    return rewrite_checked(model, rewrite, f"rewriting {name} for inference", "set [features] fold_batchnorm = false")


def rewrite_checked(
    model: nn.Module, rewrite: Callable[[nn.Module], None], what: str, advice: str, probe_size: int = 64
) -> nn.Module:
    """Apply `rewrite` to `model` in place, refusing it if the eval-mode output on a random batch moves.

    The check runs in the model's own dtype; a relative difference above 1e-4 means the rewrite
    changed the function (a network whose registration order misleads the conv/norm pairing), and
    it is refused with a one-line error that ends with `advice`. Train/eval modes are left as they were.
    """
    parameter = next(model.parameters())
    probe = torch.randn(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(parameter.device, parameter.dtype)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            before = model(probe).float()
            rewrite(model)
            after = model(probe).float()
    finally:
        for module, training in modes.items():
            module.training = training
    difference = float((after - before).norm() / before.norm().clamp_min(1e-12))
    if difference > 1e-4:
        raise ModelError(f"{what} changed its output (relative difference {difference:.1e}); {advice}")
    return model


# One folding subclass per convolution class (and one pass-through norm class), like the fp32 classes above.
_FOLDING_CLASSES: dict[type, type] = {}


class _FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose frozen (eval-mode) normalisation the convolution before it computes."""

    def forward(self, input):
        return super().forward(input) if self.training else input


def _folding_class(base: type) -> type:
    """`base` that, while its BatchNorm is in eval mode, convolves with the norm folded into its weights."""
    if base not in _FOLDING_CLASSES:

        def forward(self, input):
            norm = self.__dict__["frozen_norm"]
            if norm.training:
                return base.forward(self, input)
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = norm.weight * scale
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            if self.bias is not None:
                shift = shift + self.bias * scale
            # The class's own forward (padding, fp32 depthwise, ...) runs with the folded tensors in place
            # of its parameters; gradients flow through them to the weight and the norm's affine pair.
            parameters = self._parameters
            saved = parameters["weight"], parameters["bias"]
            parameters["weight"], parameters["bias"] = self.weight * scale.reshape(-1, 1, 1, 1), shift
            try:
                return base.forward(self, input)
            finally:
                parameters["weight"], parameters["bias"] = saved

        _FOLDING_CLASSES[base] = type(
            f"Folding{base.__name__}",
            (base,),
            {
                "forward": forward,
                "__module__": __name__,
                "__doc__": f"{base.__name__} computing the frozen BatchNorm after it.",
            },
        )
    return _FOLDING_CLASSES[base]


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Let each Conv2d compute the BatchNorm2d registered right after it while that norm is in eval mode.

    For fine-tuning with BatchNorm statistics frozen: the normalisation is then a per-channel
    scale and shift, so conv(x, W) -> BN is conv(x, W * scale) + shift, one activation pass
    instead of two forward and backward. The weights are scaled each step from the live parameters,
    so the conv weight, the norm's weight and bias all keep training; a norm put back in train mode
    normalises by itself again. Classes are swapped in place: parameter names, state_dict and
    checkpoints do not change. Returns how many pairs were folded.
    """
    # Listed first: a folded norm's class changes, so the pairing must not see half-done work.
    pairs = list(_convolution_norm_pairs(model))
    for parent, first, second in pairs:
        convolution, norm = parent._modules[first], parent._modules[second]
        convolution.__class__ = _folding_class(type(convolution))
        # A plain attribute, not a submodule: the norm stays where it is in the state_dict.
        convolution.__dict__["frozen_norm"] = norm
        norm.__class__ = _FoldedBatchNorm2d
    return len(pairs)


def fold_for_training(model: nn.Module, name: str, fold_norms: bool = True) -> nn.Module:
    """`model` with equal-sided padding moved into its convolutions and, with `fold_norms`, frozen
    BatchNorm folded (fold_frozen_batchnorm), checked against the model as it came (`rewrite_checked`).

    Each rewrite saves a separate pass over the activations (the padding copy, the BatchNorm) in every
    layer it touches, forward and backward.
    """

    def rewrite(network: nn.Module) -> None:
        pad_inside_convolutions(network)
        if fold_norms:
            fold_frozen_batchnorm(network)

    return rewrite_checked(
        model, rewrite, f"rewriting {name}'s convolutions for training", "set [finetune] fold_batchnorm = false"
    )


def rewrite_for_finetuning(model: nn.Module, name: str, settings) -> nn.Module:
    """The [finetune] rewrites that keep the function, when fold_batchnorm asks for them: padding moved
    into the convolutions, and BatchNorm folded where its statistics are frozen (freeze_bn_stats)."""
    if settings.fold_batchnorm:
        fold_for_training(model, name, fold_norms=settings.freeze_bn_stats)
    return model


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
    name: str, num_classes: int, pretrained: bool = True, weights_path: str | None = None, allow_download: bool = True
) -> tuple[nn.Module, BackboneSpec]:
    """A registered backbone with its pretrained weights (when it has any) and a fresh num_classes head.

    The head is replaced at the registry's `head_attribute` (`_fc` for EfficientNet), so no
    1000-way ImageNet layer survives, used or not.
    """
    spec = get_backbone(name)
    model = build_backbone(
        name,
        pretrained=pretrained and spec.weights is not None,
        weights_path=weights_path,
        num_classes=num_classes,
        allow_download=allow_download,
    )
    return model, spec


def finetune_groups(model: nn.Module, spec: BackboneSpec, backbone_lr_multiplier: float) -> list[dict]:
    """Optimizer groups for fine-tuning: the new head at the full LR, the pretrained body at LR x multiplier."""
    return [
        {"name": "head", "params": head_parameters(model, spec), "lr_scale": 1.0},
        {"name": "backbone", "params": body_parameters(model, spec), "lr_scale": backbone_lr_multiplier},
    ]
