"""What the training loop steps with: the optimizer over parameter groups, the LR schedule, a weight EMA,
and the `Learner` that holds them with the model and its loss."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .runtime import Runtime
from .training_settings import TrainConfig


def make_optimizer(groups: list[dict], settings: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over named groups ({"name", "params", "lr_scale"}); norms and biases get no weight decay."""
    torch_groups = []
    for group in groups:
        parameters = [parameter for parameter in group["params"] if parameter.requires_grad]
        decayed = [parameter for parameter in parameters if parameter.ndim > 1]
        plain = [parameter for parameter in parameters if parameter.ndim <= 1]
        for members, decay in ((decayed, settings.weight_decay), (plain, 0.0)):
            if members:
                base = settings.lr * group.get("lr_scale", 1.0)
                torch_groups.append(
                    {"params": members, "weight_decay": decay, "lr": base, "base_lr": base, "name": group["name"]}
                )
    if settings.optimizer == "sgd":
        return torch.optim.SGD(torch_groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0)
    return torch.optim.AdamW(torch_groups, lr=settings.lr)


def lr_factor(step: int, steps_per_epoch: int, settings: TrainConfig) -> float:
    """Multiplier of every group's base LR at optimizer step `step` (0-based)."""
    total = settings.epochs * steps_per_epoch
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    if settings.schedule == "step":
        factor = settings.step_gamma ** ((step // steps_per_epoch) // settings.step_size)
        return factor * min(1.0, (step + 1) / warmup) if warmup else factor
    if settings.schedule == "onecycle":
        # torch's OneCycleLR shape: cosine up from 1/25 over the warmup, cosine down to 1/25e4.
        if step < warmup:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * (step + 1) / warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return 1 / 25e4 + (1 - 1 / 25e4) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's LR = its base LR x `factor` (the schedule's value at this step)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class WeightAverage:
    """Exponential moving average of the weights (buffers copied), with the usual early-step warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current.to(average.dtype), 1 - decay)
            else:
                average.copy_(current)


@dataclass
class Learner:
    """What a training step changes: the model, its optimizer, loss, gradient scaler and weight average."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None
    trained: nn.Module  # `model`, or its DistributedDataParallel wrapper under torchrun

    @property
    def evaluated(self) -> nn.Module:
        """The weights validated, selected and tested: the EMA's when there is one."""
        return self.average.model if self.average is not None else self.model


def make_learner(model: nn.Module, groups: list[dict], settings: TrainConfig, runtime: Runtime) -> Learner:
    """Optimizer over `groups`, loss, the fp16 gradient scaler where needed and the EMA when asked."""
    optimizer = make_optimizer(groups, settings)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    average = WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
    return Learner(model, optimizer, criterion, scaler, average, trained=model)
