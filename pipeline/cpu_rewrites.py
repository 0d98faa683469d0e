"""Speed rewrites for CPUs, in one place: each keeps the network's function, and where it is applied is visible.

The stages apply them at one call each: `for_inference` where a frozen backbone is loaded
(`features.load_frozen_backbone`: extraction, `make predict` of a frozen arm, the bench), and
`for_training` right after an end-to-end model is built (the finetune and cnn builds, the bench's
fine-tuning rows). `runtime.resolve_runtime` sets the allocator once per process. The model classes
(models.py, backbones.py) and `Runtime.place` (device and memory format) know nothing of them.
Class swaps keep parameter names, so state dicts, checkpoints and model.pt do not change.

- **Padding moved inside the convolutions** (`pad_inside_convolutions`). EfficientNet's
  TensorFlow-"SAME" convolutions copy the activations into a ZeroPad2d before a padding-free
  convolution. Where the pad is equal on all four sides, the convolution's own zero padding computes
  the same sums: exact (bf16 Lite0 features bit for bit). One activation copy saved per layer, forward
  and backward. Applied with either fold below.
- **BatchNorm folded for inference** (`fold_batchnorm`, checked by `fold_for_inference`). An eval-mode
  BatchNorm after a convolution is a per-channel scale and shift, so it moves into the convolution's
  weights and bias and becomes an Identity. Exact in real numbers; the rounding moves (the folded
  weights are rounded once, to bf16 under autocast), so `[features] fold_batchnorm` is in the features
  key. Applies to extraction when that setting is on (the default), and to `make predict` of a frozen
  arm when its features file records it.
- **Frozen BatchNorm computed by the convolution while training** (`fold_frozen_batchnorm`, checked by
  `fold_for_training`). With BatchNorm statistics frozen, conv(x, W) -> BN equals
  conv(x, W * scale) + shift; scale and shift are recomputed from the live parameters every forward, so
  the convolution weight and the norm's affine pair keep training (fp64 gradients equal to 1e-9). One
  pass over the activations saved per layer, forward and backward; the rounding moves, so
  `[finetune] fold_batchnorm` is in the finetune key. Applies to fine-tuning with that setting and
  `freeze_bn_stats`; a norm put back in train mode normalises by itself again.
- **Depthwise convolutions trained in fp32** (`train_depthwise_in_float32`). On CPUs the bf16 weight
  gradient of a depthwise convolution is several times slower than fp32's, so grouped convolutions
  leave bf16 autocast while their weights train. Not exact: those layers compute in fp32 (more precise),
  so `float32_depthwise` is in the finetune key. Applies on CPU in bf16 with `[runtime]
  float32_depthwise` (`Runtime.float32_depthwise`); passes without gradients stay bf16, bit for bit.
- **Freed memory kept** (`keep_freed_memory`). glibc hands large blocks back to the kernel on free, so
  each batch page-faults its activations in again; mallopt keeps them in the heap. No effect on any
  number. Applies on Linux with glibc under `[runtime] keep_freed_memory` (the default).

Every function-keeping rewrite runs through `rewrite_checked`, which compares the eval-mode output
on a random batch before and after and refuses (one line naming the setting that turns it off) a
network whose module registration order misleads the conv/norm pairing.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .models import ModelError
from .training_settings import FinetuneConfig, TrainConfig


def for_inference(model: nn.Module, name: str, fold_batchnorm: bool) -> nn.Module:
    """A frozen (eval) backbone rewritten for extraction: with `fold_batchnorm`, padding moved and BatchNorm folded."""
    return fold_for_inference(model, name) if fold_batchnorm else model


def for_training(model: nn.Module, runtime, settings: TrainConfig, name: str) -> nn.Module:
    """An end-to-end model rewritten for training under `runtime` (a runtime.Runtime) and its stage's `settings`.

    In this order: the [finetune] fold_batchnorm rewrites (`rewrite_for_finetuning`), then depthwise
    convolutions in fp32 where `runtime.float32_depthwise` (CPU, bf16). The scratch CNN's settings
    have no fold (its BatchNorm trains), so it only gets the second.
    """
    if isinstance(settings, FinetuneConfig):
        rewrite_for_finetuning(model, name, settings)
    if runtime.float32_depthwise:
        train_depthwise_in_float32(model)
    return model


# One fp32-training subclass per convolution class, so swapped modules of a class share a type.
_FLOAT32_TRAINING_CLASSES: dict[type, type] = {}


def _subclass(base: type, prefix: str, forward: Callable, doc: str) -> type:
    """`base` with `forward` in place of its own, named prefix + its name (what a class swap installs)."""
    return type(f"{prefix}{base.__name__}", (base,), {"forward": forward, "__module__": __name__, "__doc__": doc})


def _float32_training_class(base: type) -> type:
    """`base` whose forward leaves CPU autocast while its own weight is being trained."""
    if base not in _FLOAT32_TRAINING_CLASSES:

        def forward(self, input):
            if torch.is_grad_enabled() and self.weight.requires_grad and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return base.forward(self, input.float())
            return base.forward(self, input)

        _FLOAT32_TRAINING_CLASSES[base] = _subclass(
            base, "Float32Training", forward, f"{base.__name__} trained in fp32 under CPU autocast."
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

        _FOLDING_CLASSES[base] = _subclass(
            base, "Folding", forward, f"{base.__name__} computing the frozen BatchNorm after it."
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


# glibc mallopt parameters (malloc.h) and the largest value its int argument takes.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST_INT = 2**31 - 1
_allocator = {"kept": None}


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse; True where it now does (Linux with glibc), else False.

    By default glibc serves blocks above its mmap threshold (128 KB, adapting up to 32 MB) with a fresh
    mmap and unmaps them on free, so each batch's activations are page-faulted in anew and much of the
    CPU time goes to the kernel. With mmap off for allocations and trimming
    only past 2 GiB free, freed blocks stay in the heap and are reused. Resident memory then stays at the
    process's peak instead of falling after it. Idempotent; DataLoader workers inherit it by fork.
    """
    if _allocator["kept"] is None:
        _allocator["kept"] = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                return False
            # mallopt returns 1 on success; both must hold, or the faults come back through the other path.
            _allocator["kept"] = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_INT))
    return _allocator["kept"]


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` has made glibc keep freed memory in this process."""
    return bool(_allocator["kept"])
