"""The softmax head: a torch linear layer trained with AdamW, its weight decay, epochs and normalisation chosen on val.

Saved as a torch file of tensors only (loads with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy

from ..settings import ConfigError, check_grid, setting
from . import HeadKind, Problem
from .linear import Normalizer, accuracy, best_on_val, normalized_splits

if TYPE_CHECKING:
    from torch import nn

TABLE = "heads.softmax"


@dataclass(frozen=True)
class SoftmaxSettings:
    weight_decays: list = setting([0.0, 1.0, 3.0], "AdamW weight decays tried on val.", minimum=0)
    # 40 epochs at 1e-2 rather than 100 at 3e-3: a cheaper search at nearly the same val (docs/recipes.md).
    epochs: int = setting(40, "Maximum epochs (the best epoch is chosen on val).", minimum=1)
    patience: int = setting(
        0,
        "Stop the search once no weight decay's val accuracy has risen for this many epochs (the best "
        "epoch so far is chosen, as without it); 0 trains every epoch.",
        minimum=0,
    )
    lr: float = setting(1e-2, "Learning rate (AdamW, constant).", minimum=0)
    batch_size: int = setting(256, "Mini-batch size.", minimum=1)
    label_smoothing: float = setting(0.0, "Label smoothing of the loss.", minimum=0, maximum=1)

    def __post_init__(self):
        check_grid(TABLE, "weight_decays", self.weight_decays)
        # Each step scales the weights by 1 - lr x decay (decoupled decay): at 1 or above they would
        # vanish or flip sign instead of shrinking.
        largest = max(self.weight_decays)
        if self.lr * largest >= 1:
            raise ConfigError(
                f"[{TABLE}] lr x weight decay must be below 1 (each step scales the weights by 1 - lr x decay); "
                f"got lr {self.lr} and weight decay {largest}: lower one of them"
            )


# --- training -----------------------------------------------------------------------------------------


class AdamWSteps:
    """AdamW without its own weight decay, computed op for op as torch.optim.AdamW's single-tensor path does
    on CPU with the default betas and eps (tests/test_head_kinds.py checks the bits are equal).

    Not torch.optim itself because constructing a torch optimizer imports torch._dynamo, seconds that
    every curve worker would pay again for a head this small.
    """

    def __init__(self, parameters: list, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.parameters, self.lr, self.betas, self.eps = list(parameters), lr, betas, eps
        self.averages = [torch.zeros_like(parameter) for parameter in self.parameters]
        self.squares = [torch.zeros_like(parameter) for parameter in self.parameters]
        # The denominator is written into a buffer kept across steps: allocating it afresh every step
        # (as `square.sqrt() / ...` does) cost more than the arithmetic for a head of this size.
        self.denominators = [torch.empty_like(parameter) for parameter in self.parameters]
        self.steps = 0

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def step(self) -> None:
        import torch

        beta1, beta2 = self.betas
        self.steps += 1
        # Python floats, as torch computes them from its step counter.
        step_size = self.lr / (1 - beta1 ** float(self.steps))
        correction_root = (1 - beta2 ** float(self.steps)) ** 0.5
        with torch.no_grad():
            states = zip(self.parameters, self.averages, self.squares, self.denominators, strict=True)
            for parameter, average, square, denominator in states:
                gradient = parameter.grad
                average.lerp_(gradient, 1 - beta1)
                square.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
                torch.sqrt(square, out=denominator).div_(correction_root).add_(self.eps)
                parameter.addcdiv_(average, denominator, value=-step_size)


def train_softmax(
    features: numpy.ndarray,
    labels: numpy.ndarray,
    num_classes: int,
    *,
    weight_decay: float,
    epochs: int,
    lr: float,
    batch_size: int,
    label_smoothing: float,
    seed: int,
    val_features: numpy.ndarray | None = None,
    val_labels: numpy.ndarray | None = None,
) -> tuple[nn.Linear, list]:
    """A linear layer trained with AdamW at a constant learning rate; returns it and val accuracy per epoch.

    With val data the head returned is the one after the best val epoch. The rate is constant so
    that this equals a fresh run of that many epochs: the choice can be refitted exactly.
    """
    return train_softmax_heads(
        features,
        labels,
        num_classes,
        weight_decays=[weight_decay],
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        label_smoothing=label_smoothing,
        seed=seed,
        val_features=val_features,
        val_labels=val_labels,
    )[0]


def train_softmax_heads(
    features: numpy.ndarray,
    labels: numpy.ndarray,
    num_classes: int,
    *,
    weight_decays: list,
    epochs: int,
    lr: float,
    batch_size: int,
    label_smoothing: float,
    seed: int,
    val_features: numpy.ndarray | None = None,
    val_labels: numpy.ndarray | None = None,
    patience: int = 0,
) -> list[tuple[nn.Linear, list]]:
    """train_softmax for several weight decays at once: one (head, val history) per decay, in order.

    The heads differ only in their decay: they start from the same seeded weights and see the same
    batches, so they are trained side by side as the rows of one matrix: one matrix product and one
    optimizer step per step instead of one per head. Each head's loss is its own batch mean and AdamW
    acts element by element, so every head follows its own training run; the decay is applied before
    the Adam step, as AdamW does. With val data and a `patience`, training stops once no head's val
    accuracy has risen for that many epochs: the histories end there, and each head is still the one
    after its first best epoch (a refit of that many epochs gives it again).
    """
    import torch
    from torch import nn

    count = len(weight_decays)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(numpy.ascontiguousarray(features, dtype=numpy.float32))
    targets = torch.from_numpy(numpy.asarray(labels, dtype=numpy.int64))
    dimensions = inputs.shape[1]
    # Seeded initialisation (not the global RNG) so selection and refit start from the same weights.
    bound = 1 / dimensions**0.5
    weight = torch.empty(num_classes, dimensions).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(num_classes).uniform_(-bound, bound, generator=generator)
    weight = nn.Parameter(weight.repeat(count, 1))
    bias = nn.Parameter(bias.repeat(count))
    decay = torch.tensor([1 - lr * value for value in weight_decays]).repeat_interleave(num_classes)
    optimizer = AdamWSteps([weight, bias], lr=lr)
    loss_function = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    val_inputs = (
        None if val_features is None else torch.from_numpy(numpy.ascontiguousarray(val_features, dtype=numpy.float32))
    )
    histories = [[] for _ in weight_decays]
    best_states = [None] * count
    for epoch in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            # [rows, heads x classes] read as [rows x heads, classes]: one cross-entropy over every head.
            logits = torch.addmm(bias, inputs[batch], weight.t()).view(-1, num_classes)
            loss = loss_function(logits, targets[batch].repeat_interleave(count))
            (loss / len(batch)).backward()
            with torch.no_grad():
                weight.mul_(decay.unsqueeze(1))
                bias.mul_(decay)
            optimizer.step()
        if val_inputs is not None:
            with torch.no_grad():
                predictions = torch.addmm(bias, val_inputs, weight.t()).view(len(val_inputs), count, num_classes)
                predictions = predictions.argmax(dim=2).numpy()
            for position, history in enumerate(histories):
                history.append(accuracy(val_labels, predictions[:, position]))
                if history[-1] > max(history[:-1], default=-1.0):
                    rows = slice(position * num_classes, (position + 1) * num_classes)
                    best_states[position] = (weight.detach()[rows].clone(), bias.detach()[rows].clone())
            if patience and all(epoch - int(numpy.argmax(history)) >= patience for history in histories):
                break
    results = []
    for position, history in enumerate(histories):
        rows = slice(position * num_classes, (position + 1) * num_classes)
        # The head as it was after the first epoch with the best val accuracy (what a refit would give).
        chosen_weight, chosen_bias = best_states[position] or (weight.detach()[rows], bias.detach()[rows])
        head = nn.Linear(dimensions, num_classes)
        with torch.no_grad():
            head.weight.copy_(chosen_weight)
            head.bias.copy_(chosen_bias)
        results.append((head, history))
    return results


def predict_softmax(head: nn.Linear, features) -> numpy.ndarray:
    """Predicted class per row."""
    import torch

    inputs = (
        features
        if isinstance(features, torch.Tensor)
        else torch.from_numpy(numpy.ascontiguousarray(features, dtype=numpy.float32))
    )
    with torch.no_grad():
        return head(inputs).argmax(dim=1).numpy()


def select_softmax(
    train: tuple,
    val: tuple,
    num_classes: int,
    *,
    normalizations: list,
    weight_decays: list,
    epochs: int,
    lr: float,
    batch_size: int,
    label_smoothing: float,
    seed: int,
    patience: int = 0,
) -> tuple:
    """Best (normalization, weight decay, epochs) by val accuracy; ties keep the earlier, cheaper choice.

    Returns (choice, every candidate with its val history, the chosen head fitted on train, its normalizer).
    """

    def trials():
        for normalizer, fit, scored in normalized_splits(normalizations, train, val):
            trained = train_softmax_heads(
                *fit,
                num_classes,
                weight_decays=weight_decays,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                label_smoothing=label_smoothing,
                seed=seed,
                val_features=scored[0],
                val_labels=scored[1],
                patience=patience,
            )
            for weight_decay, (head, history) in zip(weight_decays, trained, strict=True):
                epoch = int(numpy.argmax(history)) + 1  # first epoch that reaches the best val accuracy
                choice = {
                    "normalization": normalizer.kind,
                    "weight_decay": weight_decay,
                    "epochs": epoch,
                    "val_top1": history[epoch - 1],
                }
                yield choice, (head, normalizer), {"val_history": history}

    choice, (head, normalizer), candidates = best_on_val(trials())
    return choice, candidates, head, normalizer


# --- the kind -----------------------------------------------------------------------------------------


def _options(settings: SoftmaxSettings, seed: int) -> dict:
    return {
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "label_smoothing": settings.label_smoothing,
        "seed": seed,
    }


def _payload(head: nn.Linear, normalizer: Normalizer) -> dict:
    import torch

    # Tensors only, so the file loads with torch.load(weights_only=True).
    state = {
        name: None if value is None else torch.as_tensor(value) if not isinstance(value, str) else value
        for name, value in normalizer.state().items()
    }
    return {"state_dict": head.state_dict(), "normalizer": state}


def select(settings: SoftmaxSettings, problem: Problem) -> tuple[dict, list, dict]:
    chosen, candidates, head, normalizer = select_softmax(
        problem.fit,
        problem.val,
        problem.num_classes,
        normalizations=problem.normalizations,
        weight_decays=settings.weight_decays,
        epochs=settings.epochs,
        patience=settings.patience,
        **_options(settings, problem.seed),
    )
    return chosen, candidates, _payload(head, normalizer)


def refit(settings: SoftmaxSettings, chosen: dict, features, labels, num_classes: int, seed: int) -> tuple[dict, dict]:
    normalizer = Normalizer.fit(chosen["normalization"], features)
    head, _ = train_softmax(
        normalizer.apply(features),
        labels,
        num_classes,
        weight_decay=chosen["weight_decay"],
        epochs=chosen["epochs"],
        **_options(settings, seed),
    )
    return chosen, _payload(head, normalizer)


def _linear(payload: dict):
    """The saved layer and its normalizer."""
    import torch

    weight = payload["state_dict"]["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(payload["state_dict"])
    return head, Normalizer.from_state(payload["normalizer"])


def predict(payload: dict):
    head, normalizer = _linear(payload)
    return lambda features: predict_softmax(head, normalizer.apply(features))


def probabilities(payload: dict):
    import torch

    head, normalizer = _linear(payload)

    def softmax(features: numpy.ndarray) -> numpy.ndarray:
        with torch.no_grad():
            return torch.softmax(head(torch.from_numpy(normalizer.apply(features))), dim=1).numpy()

    return softmax


def save(path, payload: dict) -> None:
    import torch

    torch.save(payload, path)


def load(path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def finite(payload: dict) -> bool:
    return all(bool(value.isfinite().all()) for value in payload["state_dict"].values())


KIND = HeadKind(
    name="softmax",
    settings=SoftmaxSettings,
    file_name="head.pt",
    select=select,
    refit=refit,
    save=save,
    load=load,
    probabilities=probabilities,
    finite=finite,
    remedy="lower [heads.softmax] lr",
    deterministic=False,
    predict=predict,
)
