"""A backbone's stem and stages in input order, so fine-tuning can keep the leading ones frozen.

A stage is a run of blocks at one resolution and width, as each family defines it: EfficientNet's
block groups (one per row of its block table, each block recording its group's length), ResNet's
`layer1`..`layer4`, and for other torchvision models the elements of their `features` (or
`stages`) sequence after the first, which is the stem. A network none of these rules reads has no
stage map, and asking to freeze its stages is refused rather than guessed.
"""

from __future__ import annotations

from torch import nn

from .spec import BackboneError, BackboneSpec


def _efficientnet_stages(model: nn.Module) -> list[list[nn.Module]]:
    blocks = list(model._blocks)
    stages, start = [], 0
    while start < len(blocks):
        # Every block of a group carries the group's repeat count, the first included.
        length = max(1, int(blocks[start]._block_args.num_repeat))
        stages.append(blocks[start : start + length])
        start += length
    return [[model._conv_stem, model._bn0], *stages]


def _torchvision_stages(model: nn.Module) -> list[list[nn.Module]] | None:
    if all(hasattr(model, name) for name in ("conv1", "bn1", "layer1")):
        layers = [getattr(model, f"layer{number}") for number in range(1, 5) if hasattr(model, f"layer{number}")]
        return [[model.conv1, model.bn1], *([layer] for layer in layers)]
    stem, sequence = getattr(model, "stem", None), getattr(model, "stages", None)
    if isinstance(stem, nn.Module) and isinstance(sequence, nn.Sequential):
        return [[stem], *([stage] for stage in sequence)]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 1:
        return [[features[0]], *([stage] for stage in list(features)[1:])]
    return None


def stem_and_stages(model: nn.Module, spec: BackboneSpec) -> list[list[nn.Module]]:
    """[stem modules, stage 1 modules, stage 2 modules, ...] of a built backbone, in input order."""
    if spec.family in ("efficientnet_pytorch", "efficientnet_lite") and hasattr(model, "_blocks"):
        return _efficientnet_stages(model)
    found = _torchvision_stages(model) if spec.family == "torchvision" else None
    if found is None:
        raise BackboneError(
            f"{spec.name} has no stage map ({type(model).__name__}: no EfficientNet blocks, ResNet layers or "
            "features sequence), so [finetune] frozen_stages must be 0 for it"
        )
    return found


def freeze_leading_stages(model: nn.Module, spec: BackboneSpec, count: int) -> list[nn.Module]:
    """Freeze the stem and the first `count` stages (no gradient); returns the frozen modules.

    Backward then stops where they end, which is where fine-tuning saves its time. The training
    loop keeps modules whose parameters are all frozen in eval mode (train.set_train_mode), so their
    BatchNorm statistics and stochastic depth stay as pretrained too.
    """
    if count <= 0:
        return []
    groups = stem_and_stages(model, spec)
    stages = len(groups) - 1
    if count > stages:
        message = f"[finetune] frozen_stages = {count}, but {spec.name} has {stages} stages; use 0 to {stages}"
        raise BackboneError(message)
    frozen = [module for group in groups[: count + 1] for module in group]
    for module in frozen:
        module.requires_grad_(False)
    return frozen
