"""torch.distributed for runs launched by torchrun (`make finetune NPROC=N`); a no-op otherwise.

torchrun starts N copies of the same command with RANK / WORLD_SIZE / LOCAL_RANK set. Each copy
plans the same graph; rank 0 alone decides what is valid, holds unit locks, writes manifests and
builds the stages that do not split their work, while the others wait at a barrier. Stages that do
split (features, finetune, cnn) run on every rank and write their final files from rank 0 only.
Backend: gloo on CPU, nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from .errors import PipelineError

# Generous: while rank 0 builds a stage alone (e.g. feature extraction before a distributed
# fine-tune), the other ranks wait at a barrier that must not time out.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


class DistributedError(PipelineError, ValueError):
    """A setting that cannot work with the number of processes (message is one line)."""


def check_batch_size(section: str, batch_size: int) -> None:
    """The configured batch is the global batch: it must split evenly over the processes."""
    world = world_size()
    if batch_size % world:
        raise DistributedError(
            f"[{section}] batch_size {batch_size} is the global batch and must divide evenly "
            f"over {world} processes; use a multiple of {world} "
            f"(e.g. --set {section}.batch_size={batch_size - batch_size % world or world})"
        )


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    if not launched():  # no launcher: answer without importing torch (CLI start-up stays fast)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def setup(device: str) -> str:
    """Join the process group when launched; returns the device this rank uses (cuda:<local rank> on GPUs)."""
    if not launched() or active():
        return device
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return device


def shutdown() -> None:
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()


def rank() -> int:
    if not active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_values(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, on CPU through the object channel)."""
    if not active():
        return list(values)
    import torch.distributed as dist

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, [float(value) for value in values])
    return [sum(column) for column in zip(*gathered, strict=True)]


def gather_rows(rows):
    """Every rank's rows of a strided shard (tensor [n_r, ...]), merged in original order, on every rank."""
    if not active():
        return rows
    import torch
    import torch.distributed as dist

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, rows.cpu())
    merged = torch.empty((sum(len(part) for part in gathered), *rows.shape[1:]), dtype=rows.dtype)
    for position, part in enumerate(gathered):
        merged[position :: len(gathered)] = part
    return merged.to(rows.device)


def shard(count: int) -> slice:
    """The strided slice of `count` items this rank handles (all of them outside torchrun)."""
    return slice(rank(), count, world_size())
