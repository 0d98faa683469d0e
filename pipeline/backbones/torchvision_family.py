"""Any torchvision classification model as `torchvision:<model>`, described by torchvision's own weights metadata.

The head is the last nn.Linear of the model (found on the meta device, so no memory or time goes into
random weights), the feature width is its in_features, and the preprocessing and weights file come
from the model's DEFAULT weights enum. torchvision.models is imported only when such a name is asked
for: the import costs seconds, which cached runs naming only `resnet18` should not pay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneError, BackboneSpec, Preprocessing, WeightsSource
from .weights import hash_prefix

PREFIX = "torchvision:"
EXAMPLES = ("torchvision:resnet50", "torchvision:convnext_tiny", "torchvision:efficientnet_v2_s")
# ResNet18_Weights.IMAGENET1K_V1 as torchvision describes it, pinned so that the `resnet18` alias
# resolves without importing torchvision.models; tests/test_backbones.py derives it and compares.
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
RESNET18_METADATA = {
    "head_attribute": "fc",
    "feature_dim": 512,
    "preprocessing": Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    "url": RESNET18_URL,
    "description": "torchvision resnet18, IMAGENET1K_V1 weights (69.8% top-1)",
}


# Classification models whose head is a convolution, not an nn.Linear: refused with a clear error.
CONVOLUTION_HEADS = ("squeezenet1_0", "squeezenet1_1")


def classification_models() -> list[str]:
    """Every classification model torchvision can build (not detection, segmentation or video)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Dotted path and module of the model's final nn.Linear (registration order puts the head last)."""
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BackboneError(f"{type(model).__name__} has no nn.Linear head to replace")
    return linears[-1]


def derive_metadata(model_name: str) -> dict:
    """Head location, feature width, preprocessing and weights url, all read from torchvision itself."""
    from torchvision import models

    if model_name not in classification_models():
        raise BackboneError(f"torchvision has no classification model {model_name!r}")
    weights = models.get_model_weights(model_name).DEFAULT
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            head_attribute, head = last_linear(builder(model_name)())
    except NotImplementedError:  # RegNet's initialisation reads values, which meta tensors lack
        head_attribute, head = last_linear(builder(model_name)())
    recipe = weights.transforms()
    crop, resize = _first(recipe.crop_size), _first(recipe.resize_size)
    top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    accuracy = f" ({top1:.1f}% top-1)" if top1 is not None else ""
    return {
        "head_attribute": head_attribute,
        "feature_dim": head.in_features,
        "preprocessing": Preprocessing(crop, resize, recipe.interpolation.value, tuple(recipe.mean), tuple(recipe.std)),
        "url": weights.url,
        "description": f"torchvision {model_name}, {weights.name} weights{accuracy}",
    }


def _first(size) -> int:
    return int(size[0] if isinstance(size, list | tuple) else size)


def spec_from_metadata(name: str, metadata: dict) -> BackboneSpec:
    filename = metadata["url"].rsplit("/", 1)[-1]
    return BackboneSpec(
        name,
        "torchvision",
        metadata["head_attribute"],
        metadata["feature_dim"],
        metadata["preprocessing"],
        WeightsSource(filename, metadata["url"], hash_prefix(filename), package=None),
        metadata["description"],
    )


def builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        with warnings.catch_warnings():
            # GoogLeNet and Inception warn that their default initialisation will change; harmless here.
            warnings.simplefilter("ignore", FutureWarning)
            return models.get_model(model_name, weights=None)

    return build


def resolve(name: str) -> tuple[BackboneSpec, Callable[[], nn.Module]] | None:
    """Spec and builder for `torchvision:<model>`, or None when `name` is not of that form."""
    if not name.startswith(PREFIX):
        return None
    model_name = name[len(PREFIX) :]
    return spec_from_metadata(name, derive_metadata(model_name)), builder(model_name)
