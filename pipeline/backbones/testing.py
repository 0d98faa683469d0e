"""Tiny random-init backbones, one per head layout, small enough for CPU tests at 32-64 px."""

from __future__ import annotations

from itertools import pairwise

import torch
from efficientnet_pytorch import EfficientNet as LukemelasEfficientNet
from torch import nn

from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, Preprocessing


class TinyResNet(nn.Module):
    """A ResNet-shaped network small enough for CPU tests: stem, two residual stages, pooled `fc` head."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32), num_classes: int = 1000):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.Sequential(
            *(
                BasicBlock(
                    inputs,
                    outputs,
                    stride=2,
                    downsample=nn.Sequential(
                        nn.Conv2d(inputs, outputs, 1, stride=2, bias=False), nn.BatchNorm2d(outputs)
                    ),
                )
                for inputs, outputs in pairwise(widths)
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.stages(self.stem(images))), 1))


def build_tiny_efficientnet() -> nn.Module:
    # The real library class, shrunk, so tests exercise the same `_fc` / `_dropout` head path as B5.
    return LukemelasEfficientNet.from_name(
        "efficientnet-b0", width_coefficient=0.25, depth_coefficient=0.1, image_size=64
    )


def tiny_spec(name: str, family: str, head_attribute: str, feature_dim: int) -> BackboneSpec:
    return BackboneSpec(
        name,
        family,
        head_attribute,
        feature_dim,
        Preprocessing(64, 64, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        None,
        "test-only: tiny random-init model, fast on CPU at 32-64 px; no pretrained weights",
    )


TINY_BACKBONES = (
    (tiny_spec("tiny-resnet", "torchvision", "fc", 32), TinyResNet),
    (tiny_spec("tiny-efficientnet", "efficientnet_pytorch", "_fc", 320), build_tiny_efficientnet),
)
