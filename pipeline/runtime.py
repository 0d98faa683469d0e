"""Device, precision, threads, seeds, honest timers and the environment record.

The same rule decides for every stage, so each trains and measures the same way (nanoGPT style):
on CUDA bf16 autocast where the device computes it, else fp16 + GradScaler; on CPU whichever of bf16
and fp32 runs the stage's workload faster here, and for frozen backbones whether torch or onnxruntime
runs it (onnx_engine.py), measured once and stored (calibration.py).
Planning asks `plan_runtime`, which changes nothing but may store a first calibration (the unit key
needs the precision); a build calls `resolve_runtime`, which also sets the process's threads and
allocator (cpu_rewrites.keep_freed_memory).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import calibration, cpu_rewrites
from .config import ConfigError, RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: str  # torch device string actually used
    precision: str  # "bf16" | "fp16" | "fp32" after resolving "auto"
    channels_last: bool
    num_workers: int
    seed: int
    # Train depthwise convolutions in fp32 (CPU + bf16 only; cpu_rewrites.for_training applies it).
    float32_depthwise: bool = False
    inference_streams: int = 1  # extraction batches in flight at once (extract.in_streams)
    engine: str = "torch"  # what runs frozen backbones: "torch" or "onnxruntime" (fp32, CPU)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def place(self, model):
        """`model` on this device and in this memory format (it changes nothing else; see cpu_rewrites)."""
        import torch

        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def needs_grad_scaler(self) -> bool:
        return self.precision == "fp16" and self.device_type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued device work so the clock measures it (timing honesty)."""
        import torch

        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


MOST_AUTO_STREAMS = 4


def resolve_runtime(settings: RuntimeConfig, workload: calibration.Workload | None = None) -> Runtime:
    """The concrete choices for this machine (plan_runtime), applied to the process: torch threads and
    the allocator. For code that is about to compute; planning uses plan_runtime, which changes nothing."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.keep_freed_memory:
        cpu_rewrites.keep_freed_memory()
    return plan_runtime(settings, workload)


def plan_runtime(settings: RuntimeConfig, workload: calibration.Workload | None = None) -> Runtime:
    """Turn the [runtime] section into concrete choices for this machine, without touching the process.

    With `workload` (what the stage will run), precision "auto" on CPU, and engine "auto" for a frozen
    backbone's inference in fp32, are this machine's stored calibration for it; when none is stored
    yet, it is measured now (a few seconds) and stored, once: the unit key needs the choice, and
    measuring at build time instead would key on a guess.
    """
    import torch

    requested = settings.device
    if requested == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif requested == "cpu":
        device = "cpu"
    elif requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"[runtime] device = {requested!r} but CUDA is not available here; use DEVICE=cpu")
        device = requested
    elif requested == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("[runtime] device = 'mps' but MPS is not available here; use DEVICE=cpu")
        device = "mps"
    else:
        raise ConfigError(f"[runtime] device = {requested!r} is not valid; choose one of: auto, cpu, cuda, cuda:N, mps")
    precision, engine = settings.precision, "torch"
    if settings.engine == "onnxruntime" and device != "cpu":
        raise ConfigError(f"[runtime] engine = 'onnxruntime' runs on CPU only, not {device}; use engine = 'auto'")
    inference = workload is not None and workload.use == "inference"
    if device == "cpu" and workload is not None and (precision == "auto" or (inference and precision == "fp32")):
        options = calibration.options_for(workload, precision, settings.engine)
        if options != (precision,):  # else a precision set by hand, the only option: nothing to decide
            precision, engine = calibration.decide(workload, options)
    elif settings.engine == "onnxruntime" and precision != "fp32" and precision != "auto":
        raise ConfigError(f"[runtime] engine = 'onnxruntime' computes in fp32, not {precision}; set precision = 'fp32'")
    elif precision == "auto":
        if device.startswith("cuda"):
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device == "cpu":
            # Without a workload to measure (the bench's shared runtime): bf16 only where the ISA has
            # native bf16 math (AVX512-BF16 / AMX), which is right for most but not all networks.
            precision = "bf16" if calibration.native_bf16() else "fp32"
        else:
            precision = "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("[runtime] precision = 'fp16' needs a CUDA device; use bf16 or fp32 on this device")
    # Each stream holds a batch's activations, so auto stops at 4 (measured only on 2 cores).
    threads = settings.threads or torch.get_num_threads()
    streams = settings.inference_streams or (min(threads, MOST_AUTO_STREAMS) if device == "cpu" else 1)
    return Runtime(
        device=device,
        precision=precision,
        channels_last=settings.channels_last,
        num_workers=settings.num_workers,
        seed=settings.seed,
        float32_depthwise=settings.float32_depthwise and device == "cpu" and precision == "bf16",
        inference_streams=streams,
        engine=engine,
    )


def seed_everything(seed: int) -> None:
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def environment(runtime: Runtime | None = None) -> dict:
    """What ran the stage: recorded in every manifest and shown in the report."""
    import torch

    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        **calibration.cpu_identity(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "freed_memory_kept": cpu_rewrites.freed_memory_kept(),
    }
    if runtime is not None:
        record.update(
            device=runtime.device,
            precision=runtime.precision,
            channels_last=runtime.channels_last,
            inference_streams=runtime.inference_streams,
            engine=runtime.engine,
        )
        if runtime.engine == "onnxruntime":
            from . import onnx_engine

            record["onnxruntime"] = onnx_engine.version()
        if runtime.device_type == "cuda":
            record["device_name"] = torch.cuda.get_device_name(runtime.device)
    return record


class Timings:
    """Named wall-clock phases (data, extract, train, eval...), synchronised with the device."""

    def __init__(self, runtime: Runtime | None = None):
        self.runtime = runtime
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.runtime is not None:
            self.runtime.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.runtime is not None:
                self.runtime.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
