"""The one training loop of every end-to-end arm (fine-tuning and the scratch CNN).

Mixed precision and channels_last come from the Runtime; SGD-momentum or AdamW over parameter groups
with their own LR scale (backbone below head); warmup + cosine / one-cycle / StepLR / constant set per
step; label smoothing; an optional weight EMA; early stopping and best-epoch selection on val only.
After every epoch the whole state (model, optimizer, scaler, EMA, best weights, history) is written
atomically to a checkpoint that carries the unit key, so a run killed at any point resumes from its
last finished epoch and a checkpoint made under other settings is never resumed. Each epoch seeds
torch from (seed, epoch), so a resumed run repeats exactly the draws an uninterrupted run makes.

`fit` composes small parts, as torchvision's classification references do: `train_one_epoch`,
`evaluate`, `announce_estimate` and `record_epoch`, with checkpoints.py's `save_checkpoint` /
`restore_checkpoint` and optimization.py's `Learner` (model, optimizer, loss, scaler, EMA) and schedule.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoints, distributed
from .errors import PipelineError
from .images import ImageSet
from .optimization import Learner, lr_factor, make_learner, set_learning_rates
from .runtime import Runtime
from .training_settings import TrainConfig

TIMED_STEPS = 3  # steps timed (after one warm-up step) for the duration estimate


class TrainingError(PipelineError, RuntimeError):
    """Training that cannot produce a trustworthy result (a non-finite loss)."""


@dataclass
class FitJob:
    """One run of `fit`: where it checkpoints, what it answers to, how it reports and what it resumes."""

    checkpoint: Path  # the resume checkpoint (checkpoints.CHECKPOINT in the unit directory)
    key: str  # the unit key the checkpoint carries; one with another key is never resumed
    label: str  # log prefix, e.g. "finetune resnet18" (its first word names the stage in errors)
    log: Callable[[str], None] = print
    resume: dict | None = None  # what checkpoints.read_checkpoint returned for `key`; None starts fresh
    freeze_batchnorm: bool = False  # BatchNorm layers stay in eval mode (statistics fixed) while training
    extra: dict = field(default_factory=dict)  # stored in the checkpoint, handed back in the result
    on_epoch_end: Callable[[dict], None] | None = None  # called with each epoch's history row


@dataclass
class FitResult:
    """What `fit` hands back: the best-on-val weights and the per-epoch record."""

    best_state: dict
    best_epoch: int
    best_val_top1: float
    history: list
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    eval_batch_size: int  # the batch the loop validated with; testing uses it too
    extra: dict = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        """Training plus per-epoch validation time over all epochs (those of earlier, resumed runs included)."""
        return float(sum(row["seconds"] for row in self.history))


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """model.train(), keeping BatchNorm layers in eval mode (statistics fixed) when asked, and every module
    whose parameters are all frozen ([finetune] frozen_stages) in eval mode: a frozen stage computes as
    the pretrained network did, with its statistics and without stochastic depth."""
    model.train()
    for module in model.modules():
        frozen_norm = freeze_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm)
        if frozen_norm or (module.training and _all_frozen(module)):
            module.eval()


def _all_frozen(module: nn.Module) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and not any(parameter.requires_grad for parameter in parameters)


def _prepare(inputs: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return inputs.contiguous(memory_format=torch.channels_last) if runtime.channels_last else inputs


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, runtime: Runtime, batch_size: int) -> torch.Tensor:
    """float32 logits [N, classes] of a split under the eval transform (model in eval mode).

    Under torchrun each rank predicts a strided shard and every rank gets all N rows back, in order.
    """
    model.eval()
    mine = torch.arange(len(data))[distributed.shard(len(data))]
    outputs = []
    for start in range(0, len(mine), batch_size):
        with runtime.autocast():
            outputs.append(model(_prepare(data.eval_batch(mine[start : start + batch_size]), runtime)).float())
    # A rank with an empty shard (more ranks than rows) still takes part in the gather.
    logits = torch.cat(outputs) if outputs else torch.zeros(0, model_outputs(model), device=runtime.device)
    return distributed.gather_rows(logits)


def model_outputs(model: nn.Module) -> int:
    """Number of classes the model predicts (out_features of its last linear layer)."""
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1].out_features


def evaluate(model: nn.Module, criterion: nn.Module, data: ImageSet, runtime: Runtime, batch_size: int) -> dict:
    """{"val_loss", "val_top1"} of `model` on `data` (eval mode, eval transform, every image once)."""
    logits = predict(model, data, runtime, batch_size)
    return {
        "val_loss": float(criterion(logits, data.labels.to(logits.device))),
        "val_top1": float((logits.argmax(1).cpu() == data.labels.cpu()).float().mean()),
    }


def train_step(model, inputs, labels, criterion, optimizer, scaler, runtime) -> tuple[float, int]:
    with runtime.autocast():
        logits = model(_prepare(inputs, runtime))
    loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach()) * len(labels), int((logits.argmax(1) == labels).sum())


def train_one_epoch(
    learner: Learner, train_set: ImageSet, settings: TrainConfig, runtime: Runtime, epoch: int, job: FitJob
) -> dict:
    """One seeded pass over the shuffled training batches (LR set per step); the epoch's train metrics.

    Under torchrun every rank draws the same global batch (same generator), augments it whole and
    trains on its strided slice; the totals are summed over ranks.
    """
    torch.manual_seed(epoch_seed(runtime.seed, epoch))
    generator = torch.Generator().manual_seed(epoch_seed(runtime.seed, epoch))
    set_train_mode(learner.trained, job.freeze_batchnorm)
    runtime.synchronize()
    started = time.perf_counter()
    batches = list(train_set.batches(settings.batch_size, generator, shuffle=True, drop_last=True))
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(
        batches,
        desc=f"{job.label} epoch {epoch + 1}/{settings.epochs}",
        leave=False,
        disable=None if distributed.is_main() else True,
    )
    for index, positions in enumerate(bar):
        set_learning_rates(learner.optimizer, lr_factor(epoch * len(batches) + index, len(batches), settings))
        inputs = train_set.train_batch(positions, settings.augmentation, settings.minimum_crop_scale, generator)
        mine = distributed.shard(len(positions))
        labels = train_set.labels[positions[mine]]
        batch_loss, batch_correct = train_step(
            learner.trained, inputs[mine], labels, learner.criterion, learner.optimizer, learner.scaler, runtime
        )
        if not math.isfinite(batch_loss):
            # A diverged run must stop here: cached, it would be a chance-level result shown as real.
            raise TrainingError(
                f"[{job.label}] training diverged: the loss became {batch_loss / len(labels)} at epoch "
                f"{epoch + 1}, step {index + 1}; nothing was cached; lower the learning rate (or its "
                "backbone multiplier) and rerun"
            )
        if learner.average is not None:
            learner.average.update(learner.model)
        loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    runtime.synchronize()
    loss_sum, correct, seen = distributed.sum_values([loss_sum, correct, seen])
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_sum / seen,
        "train_top1": correct / seen,
        "lr": learner.optimizer.param_groups[0]["lr"],
        "train_seconds": seconds,
        "images_per_second": seen / seconds,
    }


def estimate_seconds(model, train_set, val_set, settings, runtime, criterion, freeze_batchnorm) -> tuple[float, float]:
    """(seconds per training step, seconds per eval batch), timed on a few steps; all state is restored."""
    snapshot = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    positions = next(train_set.batches(settings.batch_size, generator, shuffle=True))
    inputs = train_set.train_batch(positions, settings.augmentation, settings.minimum_crop_scale, generator)
    labels = train_set.labels[positions]
    set_train_mode(model, freeze_batchnorm)
    step_times = []
    for _ in range(TIMED_STEPS + 1):  # the first step pays one-off kernel set-up
        runtime.synchronize()
        started = time.perf_counter()
        with runtime.autocast():
            loss = criterion(model(_prepare(inputs, runtime)).float(), labels)
        loss.backward()
        runtime.synchronize()
        step_times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    eval_positions = next(val_set.batches(2 * settings.batch_size))
    model.eval()
    eval_times = []
    with torch.no_grad():
        for _ in range(TIMED_STEPS + 1):
            runtime.synchronize()
            started = time.perf_counter()
            with runtime.autocast():
                model(_prepare(val_set.eval_batch(eval_positions), runtime))
            runtime.synchronize()
            eval_times.append(time.perf_counter() - started)
    model.load_state_dict(snapshot)
    # Forward + backward without the optimizer update: the update is small next to them.
    return sum(step_times[1:]) / TIMED_STEPS, sum(eval_times[1:]) / TIMED_STEPS


def announce_estimate(
    learner: Learner,
    train_set: ImageSet,
    val_set: ImageSet,
    settings: TrainConfig,
    runtime: Runtime,
    job: FitJob,
    done: int,
) -> None:
    """Log how long the epochs after epoch `done` should take, from a few timed steps."""
    step_seconds, eval_seconds = estimate_seconds(
        learner.model, train_set, val_set, settings, runtime, learner.criterion, job.freeze_batchnorm
    )
    steps = len(list(train_set.batches(settings.batch_size, drop_last=True)))
    val_pass = eval_seconds * math.ceil(len(val_set) / (2 * settings.batch_size))
    remaining = settings.epochs - done
    evaluations = sum(validates(epoch, settings) for epoch in range(done + 1, settings.epochs + 1))
    total = step_seconds * steps * remaining + val_pass * evaluations
    job.log(
        f"[{job.label}] estimate: {step_seconds:.2f} s/step x {steps} steps + val "
        f"{eval_seconds:.2f} s/batch -> ~{step_seconds * steps + val_pass:.0f} s/epoch with val, ~{total / 60:.1f} min "
        f"for {remaining} epoch(s) (from {TIMED_STEPS} timed steps; early stopping may end sooner)"
    )


def distribute(model: nn.Module, runtime: Runtime, freeze_batchnorm: bool) -> nn.Module:
    """`model` itself in one process; under torchrun, wrapped so gradients are averaged over ranks.

    With an even split the gradient is the single-process one; BatchNorm layers in train mode see
    only their rank's slice (frozen ones, as in fine-tuning, are unaffected).
    """
    if distributed.world_size() == 1:
        return model
    trained = model
    if runtime.device_type == "cuda" and not freeze_batchnorm:
        # On GPUs (nccl) BatchNorm can use statistics of the whole global batch; gloo has no
        # SyncBatchNorm, so on CPU each rank normalises with its own slice. The parameters stay
        # the same objects, so the optimizer and `model` keep working.
        trained = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [torch.device(runtime.device).index] if runtime.device_type == "cuda" else None
    return DistributedDataParallel(trained, device_ids=device_ids)


def validates(epoch: int, settings: TrainConfig) -> bool:
    """Whether epoch `epoch` (counted from 1) is evaluated on val: every validate_every-th, and the last."""
    return epoch % settings.validate_every == 0 or epoch == settings.epochs


def record_epoch(state: dict, row: dict, evaluated: nn.Module, patience: int) -> bool:
    """Add an epoch's row to `state`, keep its weights when val improved, and decide early stopping.

    Better means a higher val top-1, or the same with a lower val loss. Returns whether it improved.
    A row without val metrics (an epoch not evaluated) is only recorded: it can neither be selected
    nor count towards patience, which counts evaluations.
    """
    state["history"].append(row)
    state["epoch"] = row["epoch"]
    if row["val_top1"] is None:
        return False
    improved = row["val_top1"] > state["best_val_top1"] or (
        row["val_top1"] == state["best_val_top1"] and row["val_loss"] < state["best_val_loss"]
    )
    if improved:
        state.update(
            best_epoch=row["epoch"],
            best_val_top1=row["val_top1"],
            best_val_loss=row["val_loss"],
            stale_epochs=0,
            best_state={name: tensor.detach().to("cpu", copy=True) for name, tensor in evaluated.state_dict().items()},
        )
    else:
        state["stale_epochs"] += 1
    state["finished"] = bool(patience) and state["stale_epochs"] >= patience
    return improved


def describe_epoch(row: dict, epochs: int, improved: bool) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f} top-1 {row['train_top1']:.3f} | "
        + (
            f"val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.4f}{' *' if improved else ''} | "
            if row["val_top1"] is not None
            else "val not evaluated | "
        )
        + f"lr {row['lr']:.2e} | {row['seconds']:.1f} s, {row['images_per_second']:.1f} img/s"
    )


def fit(
    model: nn.Module,
    groups: list[dict],
    train_set: ImageSet,
    val_set: ImageSet,
    settings: TrainConfig,
    runtime: Runtime,
    job: FitJob,
) -> FitResult:
    """Train `model` on `train_set`, select the epoch on `val_set`, checkpoint every epoch; see the module doc.

    A fresh run (no `job.resume`) first saves an epoch-0 checkpoint, so work done before `fit`, such
    as a linear probe, is not repeated when it resumes.
    """
    distributed.check_batch_size(job.label.split()[0], settings.batch_size)
    runtime.place(model)
    train_set, val_set = train_set.to(runtime.device), val_set.to(runtime.device)
    learner = make_learner(model, groups, settings, runtime)
    state = checkpoints.initial_state(job.key, job.extra)
    if job.resume is not None:
        checkpoints.restore_checkpoint(learner, state, job.resume)
        best = f" (best val top-1 {state['best_val_top1']:.4f} at epoch {state['best_epoch']})"
        job.log(
            f"[{job.label}] resuming after epoch {state['epoch']}/{settings.epochs} from "
            f"{Path(job.checkpoint).name}{best if state['best_epoch'] else ''}"
        )
    else:
        checkpoints.save_checkpoint(job.checkpoint, state, learner)
    resumed_from = state["epoch"] if job.resume is not None else None
    if not state["finished"] and state["epoch"] < settings.epochs:
        announce_estimate(learner, train_set, val_set, settings, runtime, job, state["epoch"])
    learner.trained = distribute(model, runtime, job.freeze_batchnorm)
    while not state["finished"] and state["epoch"] < settings.epochs:
        row = {"epoch": state["epoch"] + 1}
        row.update(train_one_epoch(learner, train_set, settings, runtime, state["epoch"], job))
        started = time.perf_counter()
        if validates(row["epoch"], settings):
            row.update(evaluate(learner.evaluated, learner.criterion, val_set, runtime, 2 * settings.batch_size))
        else:
            row.update(val_loss=None, val_top1=None)
        row["val_seconds"] = time.perf_counter() - started
        row["seconds"] = row["train_seconds"] + row["val_seconds"]
        row = {name: row[name] for name in checkpoints.HISTORY_FIELDS}  # in the history's column order
        improved = record_epoch(state, row, learner.evaluated, settings.patience)
        if state["finished"]:
            job.log(f"[{job.label}] early stop: no better val top-1 for {settings.patience} evaluations")
        checkpoints.save_checkpoint(job.checkpoint, state, learner)
        if distributed.is_main():
            checkpoints.write_history(Path(job.checkpoint).parent, state["history"])
        job.log(f"[{job.label}] {describe_epoch(row, settings.epochs, improved)}")
        if job.on_epoch_end is not None:
            job.on_epoch_end(row)
    return FitResult(
        best_state=state["best_state"],
        best_epoch=state["best_epoch"],
        best_val_top1=state["best_val_top1"],
        history=state["history"],
        epochs_run=state["epoch"],
        stopped_early=state["finished"] and state["epoch"] < settings.epochs,
        resumed_from_epoch=resumed_from,
        eval_batch_size=2 * settings.batch_size,
        extra=state["extra"],
    )
