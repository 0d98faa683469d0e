"""The files an end-to-end unit writes besides result.json: the resume checkpoint, the best weights, the history.

A checkpoint holds the training loop's state (`initial_state`: epoch, history, best weights, early
stopping) and every tensor state of its `Learner` (model, optimizer, scaler, EMA). It is sealed
(`integrity.write_sealed`): a damaged one is never resumed, and one made for another unit key is
ignored, so training starts over rather than continuing someone else's run.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import atomic, distributed, integrity
from .optimization import Learner

CHECKPOINT = "checkpoint.pt"  # resume state, in the unit directory; removed once the unit is complete
MODEL = "model.pt"  # best-on-val weights (state dict)
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
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


def initial_state(key: str, extra: dict) -> dict:
    """The loop state a fresh run starts from (what a checkpoint stores besides the tensors' states)."""
    return {
        "key": key,
        "epoch": 0,
        "history": [],
        "best_epoch": 0,
        "best_val_top1": -1.0,
        "best_val_loss": math.inf,
        "best_state": None,
        "stale_epochs": 0,
        "finished": False,
        "extra": dict(extra),
    }


def save_checkpoint(path: Path, state: dict, learner: Learner) -> None:
    """The loop state and every tensor state of `learner`, sealed and atomic (rank 0 alone writes)."""
    if not distributed.is_main():  # every rank holds the same state
        return
    average = learner.average
    payload = {
        **state,
        "model": learner.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scaler": learner.scaler.state_dict() if learner.scaler is not None else None,
        "average": average.model.state_dict() if average is not None else None,
        "average_updates": average.updates if average is not None else 0,
    }
    # Sealed with its digest, so a checkpoint damaged on disk is never resumed.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    integrity.write_sealed(path, buffer.getbuffer())


def restore_checkpoint(learner: Learner, state: dict, saved: dict) -> None:
    """Load a checkpoint's tensor states into `learner` and its loop state into `state`."""
    learner.model.load_state_dict(saved["model"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    if learner.scaler is not None and saved.get("scaler"):
        learner.scaler.load_state_dict(saved["scaler"])
    if learner.average is not None and saved.get("average") is not None:
        learner.average.model.load_state_dict(saved["average"])
        learner.average.updates = saved["average_updates"]
    state.update({name: saved[name] for name in state if name in saved and name != "key"})


def load_checkpoint(path: Path) -> dict:
    """The state in a checkpoint file, after checking the digest sealed in it (DamagedArtifact otherwise)."""
    return torch.load(io.BytesIO(integrity.read_sealed(path)), map_location="cpu", weights_only=True)


def read_checkpoint(path: Path, key: str, log: Callable[[str], None] = print) -> dict | None:
    """The resume checkpoint at `path` if it was written for `key`, else None (saying why)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except integrity.DamagedArtifact as error:
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


def write_model(path: Path, state: dict) -> None:
    """The best-on-val state dict, atomically, its bytes a function of the tensors alone.

    Saved through a buffer: torch.save names the archive's folder inside the file after the path it
    writes to, which here is a random temporary name, so equal weights made unequal files.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic.write_bytes_atomic(path, buffer.getvalue())


def write_history(directory: Path, history: list) -> None:
    """Per-epoch metrics as history.json and history.csv (atomically)."""
    atomic.write_json_atomic(Path(directory) / HISTORY_JSON, history)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic.write_text_atomic(Path(directory) / HISTORY_CSV, text.getvalue())
