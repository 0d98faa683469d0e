"""The one training loop of every end-to-end arm (fine-tuning and the scratch CNN).

Mixed precision and channels_last come from the Runtime; SGD-momentum or AdamW over parameter groups
with their own LR scale (backbone below head); warmup + cosine / one-cycle / StepLR / constant set per
step; label smoothing; an optional weight EMA; early stopping and best-epoch selection on val only.
After every epoch the whole state (model, optimizer, scaler, EMA, best weights, history) is written
atomically to a checkpoint that carries the unit key, so a run killed at any point resumes from its
last finished epoch and a checkpoint made under other settings is never resumed. Each epoch seeds
torch from (seed, epoch), so a resumed run repeats exactly the draws an uninterrupted run makes.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import cache, distributed
from .config import TrainConfig
from .errors import PipelineError
from .graph import BuildResult
from .images import ImageSet
from .runtime import Runtime

HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"


class TrainingError(PipelineError, RuntimeError):
    """Training that cannot produce a trustworthy result (a non-finite loss)."""


CHECKPOINT = "checkpoint.pt"  # resume state, in the unit directory; removed once the unit is complete
MODEL = "model.pt"  # best-on-val weights (state dict)
TIMED_STEPS = 3  # steps timed (after one warm-up step) for the duration estimate
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "lr",
    "train_seconds",
    "val_seconds",
    "seconds",
    "images_per_second",
)


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
    extra: dict = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        """Training plus per-epoch validation time over all epochs (those of earlier, resumed runs included)."""
        return float(sum(row["seconds"] for row in self.history))


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


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


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """model.train(), keeping BatchNorm layers in eval mode (statistics fixed) when asked."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


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


def load_checkpoint(path: Path) -> dict:
    """The state in a checkpoint file, after checking the digest sealed in it (DamagedArtifact otherwise)."""
    return torch.load(io.BytesIO(cache.read_sealed(path)), map_location="cpu", weights_only=True)


def read_checkpoint(path: Path, key: str, log: Callable[[str], None] = print) -> dict | None:
    """The resume checkpoint at `path` if it was written for `key`, else None (saying why)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except cache.DamagedArtifact as error:
        log(
            f"ignoring unreadable checkpoint {path} ({str(error).removeprefix(str(path)).strip()}); "
            "training starts over"
        )
        return None
    except Exception as error:  # any unreadable file just means "start over"; never fatal
        log(f"ignoring unreadable checkpoint {path} ({type(error).__name__}); training starts over")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log(f"ignoring checkpoint {path.name}: it was made for other settings (key {str(state.get('key'))[:8]})")
        return None
    return state


def write_history(directory: Path, history: list) -> None:
    """Per-epoch metrics as history.json and history.csv (atomically)."""
    cache.write_json_atomic(Path(directory) / HISTORY_JSON, history)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    cache.write_text_atomic(Path(directory) / HISTORY_CSV, text.getvalue())


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


def fit(
    model: nn.Module,
    groups: list[dict],
    train_set: ImageSet,
    val_set: ImageSet,
    settings: TrainConfig,
    runtime: Runtime,
    *,
    checkpoint: Path,
    key: str,
    label: str,
    log: Callable[[str], None] = print,
    resume: dict | None = None,
    freeze_batchnorm: bool = False,
    extra: dict | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `model` on `train_set`, select the epoch on `val_set`, checkpoint every epoch; see the module doc.

    `resume` is what `read_checkpoint` returned for this key (None starts fresh, after saving an
    epoch-0 checkpoint so work done before `fit`, such as a linear probe, is not repeated).
    `extra` is stored in the checkpoint and handed back in the result.
    """
    from tqdm import tqdm

    world = distributed.world_size()
    distributed.check_batch_size(label.split()[0], settings.batch_size)
    main = distributed.is_main()
    device = runtime.device
    runtime.place(model)
    train_set, val_set = train_set.to(device), val_set.to(device)
    optimizer = make_optimizer(groups, settings)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    average = WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
    evaluated = average.model if average is not None else model
    steps_per_epoch = len(list(train_set.batches(settings.batch_size, drop_last=True)))
    eval_batch_size = 2 * settings.batch_size
    state = {
        "key": key,
        "epoch": 0,
        "history": [],
        "best_epoch": 0,
        "best_val_top1": -1.0,
        "best_val_loss": math.inf,
        "best_state": None,
        "stale_epochs": 0,
        "finished": False,
        "extra": dict(extra or {}),
    }
    resumed_from = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if average is not None and resume.get("average") is not None:
            average.model.load_state_dict(resume["average"])
            average.updates = resume["average_updates"]
        state.update({name: resume[name] for name in state if name in resume and name != "key"})
        resumed_from = state["epoch"]
        log(
            f"[{label}] resuming after epoch {state['epoch']}/{settings.epochs} from {Path(checkpoint).name}"
            + (
                f" (best val top-1 {state['best_val_top1']:.4f} at epoch {state['best_epoch']})"
                if state["best_epoch"]
                else ""
            )
        )

    def save() -> None:
        if not main:  # rank 0 alone writes; every rank holds the same state
            return
        payload = {
            **state,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "average": average.model.state_dict() if average is not None else None,
            "average_updates": average.updates if average is not None else 0,
        }
        # Sealed with its digest, so a checkpoint damaged on disk is never resumed.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        cache.write_sealed(checkpoint, buffer.getbuffer())

    if resume is None:
        save()
    if not state["finished"] and state["epoch"] < settings.epochs:
        step_seconds, eval_seconds = estimate_seconds(
            model, train_set, val_set, settings, runtime, criterion, freeze_batchnorm
        )
        epoch_seconds = step_seconds * steps_per_epoch + eval_seconds * math.ceil(len(val_set) / eval_batch_size)
        remaining = settings.epochs - state["epoch"]
        log(
            f"[{label}] estimate: {step_seconds:.2f} s/step x {steps_per_epoch} steps + val "
            f"{eval_seconds:.2f} s/batch -> ~{epoch_seconds:.0f} s/epoch, ~{epoch_seconds * remaining / 60:.1f} min "
            f"for {remaining} epoch(s) (from {TIMED_STEPS} timed steps; early stopping may end sooner)"
        )
    # Under torchrun: DistributedDataParallel averages gradients over ranks. Each rank draws the same
    # global batch (same generator), augments it whole and trains on its strided slice, so with an
    # even split the gradient is the single-process one; BatchNorm layers in train mode see only
    # their rank's slice (frozen ones, as in fine-tuning, are unaffected).
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda") and not freeze_batchnorm:
            # On GPUs (nccl) BatchNorm can use statistics of the whole global batch; gloo has no
            # SyncBatchNorm, so on CPU each rank normalises with its own slice. The parameters stay
            # the same objects, so the optimizer and `model` keep working.
            trained = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = DistributedDataParallel(
            trained, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )
    step = state["epoch"] * steps_per_epoch
    while not state["finished"] and state["epoch"] < settings.epochs:
        epoch = state["epoch"]
        torch.manual_seed(epoch_seed(runtime.seed, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(runtime.seed, epoch))
        set_train_mode(trained, freeze_batchnorm)
        runtime.synchronize()
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            list(train_set.batches(settings.batch_size, generator, shuffle=True, drop_last=True)),
            desc=f"{label} epoch {epoch + 1}/{settings.epochs}",
            leave=False,
            disable=None if main else True,
        )
        for positions in bar:
            factor = lr_factor(step, steps_per_epoch, settings)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            inputs = train_set.train_batch(positions, settings.augmentation, settings.minimum_crop_scale, generator)
            mine = distributed.shard(len(positions))
            batch_loss, batch_correct = train_step(
                trained, inputs[mine], train_set.labels[positions[mine]], criterion, optimizer, scaler, runtime
            )
            if not math.isfinite(batch_loss):
                # A diverged run must stop here: cached, it would be a chance-level result shown as real.
                raise TrainingError(
                    f"[{label}] training diverged: the loss became {batch_loss / len(positions[mine])} "
                    f"at epoch {epoch + 1}, step {step - epoch * steps_per_epoch + 1}; nothing was "
                    "cached; lower the learning rate (or its backbone multiplier) and rerun"
                )
            if average is not None:
                average.update(model)
            step += 1
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(positions[mine])
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        runtime.synchronize()
        loss_sum, correct, seen = distributed.sum_values([loss_sum, correct, seen])
        train_seconds = time.perf_counter() - started
        logits = predict(evaluated, val_set, runtime, eval_batch_size)
        val_loss = float(criterion(logits, val_set.labels.to(logits.device)))
        val_top1 = float((logits.argmax(1).cpu() == val_set.labels.cpu()).float().mean())
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "val_seconds": seconds - train_seconds,
            "seconds": seconds,
            "images_per_second": seen / train_seconds,
        }
        state["history"].append(row)
        improved = val_top1 > state["best_val_top1"] or (
            val_top1 == state["best_val_top1"] and val_loss < state["best_val_loss"]
        )
        if improved:
            state.update(
                best_epoch=epoch + 1,
                best_val_top1=val_top1,
                best_val_loss=val_loss,
                stale_epochs=0,
                best_state={
                    name: tensor.detach().to("cpu", copy=True) for name, tensor in evaluated.state_dict().items()
                },
            )
        else:
            state["stale_epochs"] += 1
        state["epoch"] = epoch + 1
        if settings.patience and state["stale_epochs"] >= settings.patience:
            state["finished"] = True
            log(f"[{label}] early stop: no better val top-1 for {settings.patience} epochs")
        save()
        if main:
            write_history(Path(checkpoint).parent, state["history"])
        log(
            f"[{label}] epoch {epoch + 1}/{settings.epochs}: train loss {row['train_loss']:.3f} "
            f"top-1 {row['train_top1']:.3f} | val loss {val_loss:.3f} top-1 {val_top1:.4f}"
            f"{' *' if improved else ''} | lr {row['lr']:.2e} | {seconds:.1f} s, {row['images_per_second']:.1f} img/s"
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
    return FitResult(
        best_state=state["best_state"],
        best_epoch=state["best_epoch"],
        best_val_top1=state["best_val_top1"],
        history=state["history"],
        epochs_run=state["epoch"],
        stopped_early=state["finished"] and state["epoch"] < settings.epochs,
        resumed_from_epoch=resumed_from,
        extra=state["extra"],
    )


def finish_arm(
    context,
    model: nn.Module,
    result: FitResult,
    test_set: ImageSet,
    runtime: Runtime,
    settings: TrainConfig,
    record: dict,
    timings: dict,
    *,
    test_image_ids,
) -> BuildResult:
    """Test the best-on-val weights, write model.pt, history, result.json and the test predictions (by
    `test_image_ids`, in test_set's order), drop the resume checkpoint.

    `record` holds the arm's own fields (arm, method, backbone, head, input_size, selected...);
    the test metrics, times and history are added here.
    """
    from . import evaluate
    from .runtime import environment

    model.load_state_dict(result.best_state)
    runtime.synchronize()
    started = time.perf_counter()
    logits = predict(model, test_set.to(runtime.device), runtime, 2 * settings.batch_size)
    runtime.synchronize()
    eval_seconds = time.perf_counter() - started
    class_names = list(record.pop("class_names"))
    predicted = logits.argmax(1).cpu().numpy()
    metrics = evaluate.classification_metrics(test_set.labels.numpy(), predicted, len(class_names))
    directory = context.directory
    if distributed.is_main():
        with cache.atomic_path(directory / MODEL) as temporary:
            torch.save(result.best_state, temporary)
        write_history(directory, result.history)
    train_seconds = result.train_seconds + timings.get("probe_seconds", 0.0)
    images_trained = sum(row["images_per_second"] * row["train_seconds"] for row in result.history)
    full = {
        **record,
        "fit_on": "train",
        "seed": runtime.seed,
        "device": runtime.device,
        "precision": runtime.precision,
        "test_top1": metrics["top1"],
        "test_mean_per_class": metrics["mean_per_class"],
        "val_top1": result.best_val_top1,
        "train_seconds": train_seconds,
        "extract_seconds": 0.0,
        "eval_seconds": eval_seconds,
        "total_seconds": train_seconds + eval_seconds + timings.get("data_seconds", 0.0),
        "images_per_second": images_trained / max(1e-9, sum(row["train_seconds"] for row in result.history)),
        "eval_images_per_second": len(test_set) / eval_seconds,
        "per_class_accuracy": metrics["per_class_accuracy"],
        "confusion_matrix": metrics["confusion_matrix"],
        "class_names": class_names,
        "history": result.history,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "timings": {**timings, "train_seconds": train_seconds, "eval_seconds": eval_seconds},
        "world_size": distributed.world_size(),
    }
    if distributed.is_main():
        evaluate.write_result(
            directory, full, labels=test_set.labels.numpy(), predictions=predicted, image_ids=test_image_ids
        )
    context.log(
        f"[{record['arm']}] test top-1 {metrics['top1']:.4f}, mean per-class {metrics['mean_per_class']:.4f} "
        f"(best val {result.best_val_top1:.4f} at epoch {result.best_epoch}/{result.epochs_run}); "
        f"train {train_seconds:.0f} s, test {eval_seconds:.0f} s"
    )
    return BuildResult(
        files=[evaluate.RESULT, evaluate.PREDICTIONS, HISTORY_JSON, HISTORY_CSV, MODEL],
        metrics={
            "test_top1": metrics["top1"],
            "test_mean_per_class": metrics["mean_per_class"],
            "val_top1": result.best_val_top1,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
        },
        timings={**timings, "train_seconds": train_seconds, "eval_seconds": eval_seconds},
        environment=environment(runtime),
        # The checkpoint only resumes this build; keeping it would let a forced rebuild
        # "resume" a finished run. The runner drops it after the manifest is written.
        discard_after_manifest=[CHECKPOINT],
    )
