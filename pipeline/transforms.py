"""Image transforms derived from a backbone's preprocessing (eval) plus training augmentation."""

from __future__ import annotations

from collections.abc import Callable

from .backbones import Preprocessing

INTERPOLATIONS = ("bilinear", "bicubic")


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation {name!r} is not one of {INTERPOLATIONS}")
    return InterpolationMode.BILINEAR if name == "bilinear" else InterpolationMode.BICUBIC


def crop_sizes(preprocessing: Preprocessing, input_size: int = 0) -> tuple[int, int]:
    """(resize, crop) in pixels; a custom input size keeps the weights' resize/crop ratio."""
    crop = input_size or preprocessing.input_size
    resize = round(crop * preprocessing.resize_size / preprocessing.input_size)
    return resize, crop


def resize_and_crop(resize: int, crop: int, interpolation: str) -> list:
    """The geometry of every eval view: resize the shorter side to `resize`, then centre-crop `crop` square."""
    from torchvision import transforms

    return [
        transforms.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
        transforms.CenterCrop(crop),
    ]


def eval_transform(preprocessing: Preprocessing, input_size: int = 0) -> Callable:
    """PIL image -> normalised float tensor: resize shorter side, center crop, normalise."""
    from torchvision import transforms

    resize, crop = crop_sizes(preprocessing, input_size)
    return transforms.Compose(
        [
            *resize_and_crop(resize, crop, preprocessing.interpolation),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def train_transform(
    preprocessing: Preprocessing, input_size: int = 0, augmentation: str = "crop-flip", minimum_scale: float = 0.35
) -> Callable:
    """PIL image -> augmented normalised tensor (random resized crop, flip, optional policy)."""
    from torchvision import transforms

    _, crop = crop_sizes(preprocessing, input_size)
    interpolation = _interpolation(preprocessing.interpolation)
    if augmentation == "none":
        return eval_transform(preprocessing, input_size)
    steps = []
    if augmentation == "flip":
        steps += resize_and_crop(*crop_sizes(preprocessing, input_size), preprocessing.interpolation)
    else:
        steps.append(
            transforms.RandomResizedCrop(crop, scale=(minimum_scale, 1.0), interpolation=interpolation, antialias=True)
        )
    steps.append(transforms.RandomHorizontalFlip())
    if augmentation == "trivialaugment":
        steps.append(transforms.TrivialAugmentWide(interpolation=interpolation))
    elif augmentation == "randaugment":
        steps.append(transforms.RandAugment(interpolation=interpolation))
    steps += [transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)]
    return transforms.Compose(steps)
