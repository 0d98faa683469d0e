"""Linear heads on cached features: feature normalisation, a torch softmax head, a scikit-learn logistic head.

Selection never sees test: every candidate is fitted on the fit rows of train and scored on val;
the final head is refitted with the chosen hyper-parameters (on train or train+val).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy
import torch
from torch import nn

from .errors import PipelineError

NORMALIZATIONS = ("none", "standardize", "l2", "l2-standardize")


class HeadError(PipelineError, RuntimeError):
    """A head that cannot give a trustworthy result (weights that are not finite)."""


@dataclass
class Normalizer:
    """Optional L2 normalisation per row, then optional standardisation with statistics of the fit set."""

    kind: str
    mean: numpy.ndarray | None = None
    scale: numpy.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, features: numpy.ndarray) -> Normalizer:
        """Statistics from `features` only (the rows the head is fitted on, never val or test when selecting)."""
        if kind not in NORMALIZATIONS:
            raise ValueError(f"normalization {kind!r} is not one of {', '.join(NORMALIZATIONS)}")
        normalizer = cls(kind)
        if "standardize" in kind:
            rows = normalizer._l2(features.astype(numpy.float64))
            normalizer.mean = rows.mean(axis=0)
            # Constant features (dead units) get scale 1 so they stay 0 instead of dividing by zero.
            std = rows.std(axis=0)
            normalizer.scale = numpy.where(std > 1e-12, std, 1.0)
        return normalizer

    def _l2(self, features: numpy.ndarray) -> numpy.ndarray:
        if not self.kind.startswith("l2"):
            return features
        norms = numpy.linalg.norm(features, axis=1, keepdims=True)
        return features / numpy.maximum(norms, 1e-12)

    def apply(self, features: numpy.ndarray) -> numpy.ndarray:
        """Normalised float32 copy of `features`."""
        rows = self._l2(features.astype(numpy.float64))
        if self.mean is not None:
            rows = (rows - self.mean) / self.scale
        return rows.astype(numpy.float32)

    def state(self) -> dict:
        return {"kind": self.kind, "mean": self.mean, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict) -> Normalizer:
        """Inverse of state(); statistics may come back as numpy arrays or torch tensors."""

        def array(value):
            return None if value is None else numpy.asarray(value, dtype=numpy.float64)

        return cls(state["kind"], array(state["mean"]), array(state["scale"]))


def accuracy(labels: numpy.ndarray, predictions: numpy.ndarray) -> float:
    return float(numpy.mean(numpy.asarray(labels) == numpy.asarray(predictions)))


# --- softmax head (torch) ---------------------------------------------------------------------------


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
) -> list[tuple[nn.Linear, list]]:
    """train_softmax for several weight decays at once: one (head, val history) per decay, in order.

    The heads differ only in their decay: they start from the same seeded weights and see the same
    batches, so they are trained side by side as the rows of one matrix: one matrix product and one
    optimizer step per step instead of one per head. Each head's loss is its own batch mean and AdamW
    acts element by element, so every head follows its own training run; the decay is applied before
    the Adam step, as AdamW does.
    """
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
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    loss_function = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    val_inputs = (
        None if val_features is None else torch.from_numpy(numpy.ascontiguousarray(val_features, dtype=numpy.float32))
    )
    histories = [[] for _ in weight_decays]
    best_states = [None] * count
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
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
) -> tuple:
    """Best (normalization, weight decay, epochs) by val accuracy; ties keep the earlier, cheaper choice.

    Returns (choice, every candidate with its val history, the chosen head fitted on train, its normalizer).
    """
    best, candidates = None, []
    for kind in normalizations:
        normalizer = Normalizer.fit(kind, train[0])
        fit_features, val_features = normalizer.apply(train[0]), normalizer.apply(val[0])
        trained = train_softmax_heads(
            fit_features,
            train[1],
            num_classes,
            weight_decays=weight_decays,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            label_smoothing=label_smoothing,
            seed=seed,
            val_features=val_features,
            val_labels=val[1],
        )
        for weight_decay, (head, history) in zip(weight_decays, trained, strict=True):
            epoch = int(numpy.argmax(history)) + 1  # first epoch that reaches the best val accuracy
            candidate = {
                "normalization": kind,
                "weight_decay": weight_decay,
                "epochs": epoch,
                "val_top1": history[epoch - 1],
            }
            candidates.append({**candidate, "val_history": history})
            if best is None or candidate["val_top1"] > best[0]["val_top1"]:
                best = (candidate, head, normalizer)
    return best[0], candidates, best[1], best[2]


# --- logistic head (scikit-learn) ---------------------------------------------------------------------


def make_logistic(c: float, solver: str, max_iter: int, tolerance: float, seed: int):
    """Multinomial L2-regularised logistic regression, warm-startable along a C path."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, tol=tolerance, solver=solver, warm_start=True, random_state=seed)


def fit_logistic(model, features: numpy.ndarray, labels: numpy.ndarray, blas_threads: int = 0):
    """Fit with at most `blas_threads` BLAS threads (0: no limit), the solver's convergence warning
    turned into a recorded flag instead of console noise."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(record=True) as caught, threadpool_limits(blas_threads or None, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, labels)
    converged = not any(issubclass(item.category, ConvergenceWarning) for item in caught)
    return model, converged


def select_logistic(
    train: tuple,
    val: tuple,
    *,
    normalizations: list,
    cs: list,
    solver: str,
    max_iter: int,
    tolerance: float,
    seed: int,
    blas_threads: int = 0,
) -> tuple:
    """Best (normalization, C) by val accuracy; C runs from strong to weak regularisation, warm-started.

    Returns (choice, every candidate, the chosen model fitted on train, its normalizer).
    """
    best, candidates = None, []
    for kind in normalizations:
        normalizer = Normalizer.fit(kind, train[0])
        fit_features, val_features = normalizer.apply(train[0]), normalizer.apply(val[0])
        model = make_logistic(min(cs), solver, max_iter, tolerance, seed)
        for c in sorted(cs):
            model.set_params(C=c)
            model, converged = fit_logistic(model, fit_features, train[1], blas_threads)
            candidate = {"normalization": kind, "c": c, "val_top1": accuracy(val[1], model.predict(val_features))}
            candidates.append({**candidate, "iterations": int(numpy.max(model.n_iter_)), "converged": converged})
            if best is None or candidate["val_top1"] > best[0]["val_top1"]:
                best = (candidate, copy.deepcopy(model), normalizer)
    return best[0], candidates, best[1], best[2]
