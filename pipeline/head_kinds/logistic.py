"""The logistic head: scikit-learn multinomial logistic regression, C and normalisation chosen on val.

C runs from strong to weak regularisation, warm-started along the path. Saved with joblib.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy

from ..settings import check_grid, setting
from . import HeadKind, Problem
from .linear import Normalizer, accuracy, best_on_val, normalized_splits

TABLE = "heads.logistic"


@dataclass(frozen=True)
class LogisticSettings:
    cs: list = setting([0.3, 1.0, 3.0], "Inverse regularisation strengths C tried on val (scikit-learn).")
    solver: str = setting("lbfgs", "scikit-learn solver of the (multinomial) head.", choices=("lbfgs", "newton-cg"))
    max_iter: int = setting(1000, "Iteration limit of the solver.", minimum=1)
    tolerance: float = setting(1e-4, "Stopping tolerance of the solver.", minimum=0)
    blas_threads: int = setting(
        1,
        "BLAS threads while the solver runs (0 = the library's default, one per "
        "core). One, because the study's matrices are too small to split; raise it "
        "for much larger feature sets. Rounding depends on it, so it is part of the "
        "logistic heads' key.",
        minimum=0,
    )

    def __post_init__(self):
        check_grid(TABLE, "cs", self.cs, positive=True)


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

    def trials():
        for normalizer, fit, scored in normalized_splits(normalizations, train, val):
            model = make_logistic(min(cs), solver, max_iter, tolerance, seed)
            for c in sorted(cs):
                model.set_params(C=c)
                model, converged = fit_logistic(model, *fit, blas_threads)
                choice = {
                    "normalization": normalizer.kind,
                    "c": c,
                    "val_top1": accuracy(scored[1], model.predict(scored[0])),
                }
                # A copy: the next C warm-starts from this model and changes it.
                details = {"iterations": int(numpy.max(model.n_iter_)), "converged": converged}
                yield choice, (copy.deepcopy(model), normalizer), details

    choice, (model, normalizer), candidates = best_on_val(trials())
    return choice, candidates, model, normalizer


# --- the kind -----------------------------------------------------------------------------------------


def select(settings: LogisticSettings, problem: Problem) -> tuple[dict, list, dict]:
    chosen, candidates, model, normalizer = select_logistic(
        problem.fit,
        problem.val,
        normalizations=problem.normalizations,
        cs=settings.cs,
        solver=settings.solver,
        max_iter=settings.max_iter,
        tolerance=settings.tolerance,
        seed=problem.seed,
        blas_threads=settings.blas_threads,
    )
    converged = next(
        c["converged"] for c in candidates if c["normalization"] == chosen["normalization"] and c["c"] == chosen["c"]
    )
    return {**chosen, "converged": converged}, candidates, {"model": model, "normalizer": normalizer.state()}


def refit(settings: LogisticSettings, chosen: dict, features, labels, num_classes: int, seed: int) -> tuple[dict, dict]:
    normalizer = Normalizer.fit(chosen["normalization"], features)
    model = make_logistic(chosen["c"], settings.solver, settings.max_iter, settings.tolerance, seed)
    model, converged = fit_logistic(model, normalizer.apply(features), labels, settings.blas_threads)
    return {**chosen, "converged": converged}, {"model": model, "normalizer": normalizer.state()}


def predict(payload: dict):
    model, normalizer = payload["model"], Normalizer.from_state(payload["normalizer"])
    return lambda features: model.predict(normalizer.apply(features))


def probabilities(payload: dict):
    model, normalizer = payload["model"], Normalizer.from_state(payload["normalizer"])
    num_classes = len(payload["class_names"])

    def logistic(features: numpy.ndarray) -> numpy.ndarray:
        # Columns follow model.classes_; a class absent from the fit rows keeps probability 0.
        rows = numpy.zeros((len(features), num_classes))
        rows[:, model.classes_] = model.predict_proba(normalizer.apply(features))
        return rows

    return logistic


def save(path, payload: dict) -> None:
    import joblib

    joblib.dump(payload, path)


def load(path) -> dict:
    import joblib

    return joblib.load(path)


def finite(payload: dict) -> bool:
    return all(numpy.isfinite(array).all() for array in (payload["model"].coef_, payload["model"].intercept_))


KIND = HeadKind(
    name="logistic",
    settings=LogisticSettings,
    file_name="head.joblib",
    select=select,
    refit=refit,
    save=save,
    load=load,
    probabilities=probabilities,
    finite=finite,
    remedy="lower [heads.logistic] cs (stronger regularisation)",
    deterministic=True,
    predict=predict,
)
