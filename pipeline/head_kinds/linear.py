"""What the heads share: feature normalisation, choosing on val, and the full-batch L-BFGS linear probe.

Selection never sees test: every candidate is fitted on the fit rows and scored on val, and the
first candidate with the best val accuracy wins (a later tie never displaces the earlier, cheaper
one). The L-BFGS probe is the one fine-tuning fits on frozen features before training end to end
(LP-FT); its L2 strength is chosen on val the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy

if TYPE_CHECKING:
    import torch

NORMALIZATIONS = ("none", "standardize", "l2", "l2-standardize")
PROBE_ITERATIONS = 500  # L-BFGS iterations per L2 strength; converges well before on 1k rows


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
        if self.kind == "none":  # float32 through float64 and back is the identity: skip both copies' work
            return numpy.array(features, dtype=numpy.float32)
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


def normalized_splits(normalizations: list, fit: tuple, val: tuple) -> Iterator[tuple[Normalizer, tuple, tuple]]:
    """Per normalisation tried: (its normalizer fitted on the fit rows, fit rows, val rows), both normalised."""
    for kind in normalizations:
        normalizer = Normalizer.fit(kind, fit[0])
        yield normalizer, (normalizer.apply(fit[0]), fit[1]), (normalizer.apply(val[0]), val[1])


def best_on_val(trials: Iterable[tuple[dict, Any, dict]]) -> tuple[dict, Any, list[dict]]:
    """(best choice, its fitted head, every candidate) over (choice, fitted head, details) tried in order.

    A choice holds its "val_top1"; a candidate is the choice with its details (histories, solver
    flags). The first choice with the highest val accuracy wins.
    """
    best, candidates = None, []
    for choice, fitted, details in trials:
        candidates.append({**choice, **details})
        if best is None or choice["val_top1"] > best[0]["val_top1"]:
            best = (choice, fitted)
    if best is None:
        raise ValueError("no candidate to choose from: every grid tried on val needs at least one value")
    return best[0], best[1], candidates


# --- the L-BFGS linear probe (LP-FT) ------------------------------------------------------------------


def fit_lbfgs_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [classes, dim], bias) minimising smoothed cross-entropy + weight_decay/2 |W|^2, full-batch L-BFGS."""
    import torch
    import torch.nn.functional as F

    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=PROBE_ITERATIONS,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels, label_smoothing=label_smoothing)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def select_lbfgs_probe(
    train: tuple,
    val: tuple,
    num_classes: int,
    *,
    weight_decays: list,
    label_smoothing: float,
    report: Callable[[float, float], None] = lambda weight_decay, val_top1: None,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The probe at each L2 strength on (features, labels) tensors, best on val: (choice, weight, bias).

    `report(weight_decay, val_top1)` hears each strength's score as it is measured.
    """

    def trials():
        for weight_decay in weight_decays:
            weight, bias = fit_lbfgs_head(train[0], train[1], num_classes, weight_decay, label_smoothing)
            # A float32 mean, as the probe has always scored (its value is recorded with the arm).
            val_top1 = float(((val[0] @ weight.T + bias).argmax(1) == val[1]).float().mean())
            report(weight_decay, val_top1)
            yield {"weight_decay": weight_decay, "val_top1": val_top1}, (weight, bias), {}

    choice, (weight, bias), _ = best_on_val(trials())
    return choice, weight, bias
