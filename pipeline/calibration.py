"""`precision = "auto"` on CPU, decided by a short measurement on the machine at hand and stored.

Whether bf16 autocast beats fp32 on a CPU depends on the processor and on the network: on one Xeon
(avx512_bf16, no AMX) bf16 ran EfficientNet-Lite0 faster and ResNet-18 slower, so no instruction-set
rule picks right for both. The first plan that needs a workload's precision (a backbone or CNN, used
for inference or for a training step, at the stage's batch and input size) times both on random
inputs (measure_rates: a warm-up step, then a few alternating timed steps, median) and stores the
decision with its rates in `<cache root>/calibration/<machine>.json`, keyed by the machine's
identity (CPU model, the flags that matter, core count, torch version). The precision enters unit
keys, so a stored decision always wins over a new measurement: measuring again on the same machine
could flip a near tie and rebuild caches. A different machine identity gets its own file and
measures again. On a CPU whose flags show no bf16 instructions (AVX2-only x86, ARM without bf16) bf16
is emulated, and nothing is timed: emulated bf16 lost to fp32 several times over on every workload
measured, and timing it was a cold run's largest fixed cost (docs/benchmarks.md, Precision calibration).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import atomic

FOLDER = "calibration"
CANDIDATES = ("bf16", "fp32")
WARMUP_STEPS = 1
TIMED_STEPS = 5
MINIMUM_TIMED_STEPS = 3
BUDGET_SECONDS = 10.0
CLEAR_RATIO = 2.0  # one timed step each decides when one option is this many times slower
SCREEN_RATIO = 5.0  # the warm-up steps alone decide when one is this many times slower
# bf16 rounds activations, so it has to win clearly; a near tie keeps the exact fp32.
BF16_MARGIN = 1.05
# Flags that decide how fast bf16 and fp32 convolutions run (absent ones are simply not listed).
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "bf16",
    "sve",
)


@dataclass(frozen=True)
class Workload:
    """What a stage will run: `build(precision)` gives the model as the stage runs it, random weights."""

    model: str  # backbone name, or "cnn:<architecture>"
    use: str  # "inference" (features, predict) or "training" (finetune, cnn)
    batch_size: int
    input_size: int
    channels_last: bool
    cache_root: Path
    build: Callable[[str], object] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{self.model} {self.use} batch {self.batch_size} {self.input_size}px {layout}"


def _cpuinfo() -> tuple[str, set[str] | None]:
    """The CPU's model name and flags (Linux /proc/cpuinfo; else platform's name and None)."""
    model, flags = platform.processor() or platform.machine(), None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name in ("model name", "hardware") and value.strip():
                model = value.strip()
            elif name in ("flags", "features"):
                flags = (flags or set()) | set(value.split())
    return model, flags


def cpu_identity() -> dict:
    """The CPU's model name and the flags of it that matter here."""
    model, flags = _cpuinfo()
    return {"cpu_model": model, "cpu_flags": [flag for flag in RELEVANT_FLAGS if flag in (flags or ())]}


# The instructions that do bf16 arithmetic natively, by the flag names /proc/cpuinfo uses (x86, ARM).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16() -> bool | None:
    """Whether the CPU does bf16 arithmetic natively; None when its flags could not be read."""
    _, flags = _cpuinfo()
    return None if flags is None else any(flag in flags for flag in NATIVE_BF16_FLAGS)


def machine_identity() -> dict:
    import torch

    return {**cpu_identity(), "cpu_count": os.cpu_count(), "torch": torch.__version__}


def calibration_path(cache_root: Path, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_root) / FOLDER / f"{digest}.json"


def stored_decisions(cache_root: Path, identity: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """This machine's stored decisions by workload label; {} when none, or (with a note) when damaged."""
    identity = identity or machine_identity()
    path = calibration_path(cache_root, identity)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        if record["identity"] != identity or not all(
            decision["precision"] in CANDIDATES for decision in record["decisions"].values()
        ):
            raise ValueError("its content does not match this machine")
        return record["decisions"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"[calibration] ignoring damaged {path} ({type(error).__name__}: {error}); measuring again")
        return {}


def measure_rates(workload: Workload) -> dict[str, float]:
    """Images per second of one workload step in each candidate precision.

    After WARMUP_STEPS of each, the candidates' steps alternate, so a change in the machine's load
    slows both alike; each rate is the median of its timed steps: TIMED_STEPS, or fewer (never under
    MINIMUM_TIMED_STEPS) once BUDGET_SECONDS have passed, for slow workloads on busy machines, or
    just one when the first already differ CLEAR_RATIO times, or none when the warm-up steps differ
    SCREEN_RATIO times (emulated bf16 ran Lite0 15x slower than fp32 on an AVX2-only EPYC).
    """
    steps = {precision: _step(workload, precision) for precision in CANDIDATES}
    warmup: dict[str, list[float]] = {precision: [] for precision in CANDIDATES}
    for precision, step in steps.items():
        for _ in range(WARMUP_STEPS):
            begun = time.perf_counter()
            step()
            warmup[precision].append(time.perf_counter() - begun)
    if _clear(warmup, SCREEN_RATIO):
        # So far apart that one-off kernel set-up cannot explain it: timing more would only cost.
        return {precision: workload.batch_size / min(times) for precision, times in warmup.items()}
    seconds: dict[str, list[float]] = {precision: [] for precision in CANDIDATES}
    started = time.perf_counter()
    for index in range(TIMED_STEPS):
        if index >= MINIMUM_TIMED_STEPS and time.perf_counter() - started > BUDGET_SECONDS:
            break
        if index >= 1 and _clear(seconds, CLEAR_RATIO):
            break  # one option is several times slower: more steps would not change the choice
        for precision, step in steps.items():
            begun = time.perf_counter()
            step()
            seconds[precision].append(time.perf_counter() - begun)
    return {precision: workload.batch_size / statistics.median(times) for precision, times in seconds.items()}


def _clear(seconds: dict[str, list[float]], ratio: float) -> bool:
    fastest = [min(times) for times in seconds.values()]
    return max(fastest) > ratio * min(fastest)


def _step(workload: Workload, precision: str) -> Callable[[], None]:
    """One batch of `workload` in `precision` on random inputs: a forward pass, or a whole training step."""
    import torch

    model = workload.build(precision)
    inputs = torch.randn(workload.batch_size, 3, workload.input_size, workload.input_size)
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    if workload.use == "inference":

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(inputs)

        return step
    # A tiny learning rate: the step costs the same and the random model stays finite.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = model(inputs)
        labels = torch.zeros(len(outputs), dtype=torch.long)
        torch.nn.functional.cross_entropy(outputs.float(), labels).backward()
        optimizer.step()

    return step


def choose(rates: dict[str, float]) -> str:
    return "bf16" if rates["bf16"] > BF16_MARGIN * rates["fp32"] else "fp32"


def decide_precision(workload: Workload, log: Callable[[str], None] = print) -> str:
    """The stored decision for `workload` on this machine, or a new measurement, stored before it is used."""

    identity = machine_identity()
    decision = stored_decisions(workload.cache_root, identity, log).get(workload.label)
    if decision is not None:
        return decision["precision"]
    started = time.perf_counter()
    if native_bf16() is False:
        decision = {"precision": "fp32", "rates": {}, "rule": "no bf16 instructions: bf16 is emulated"}
    else:
        rates = measure_rates(workload)
        rounded = {precision: round(rate, 2) for precision, rate in rates.items()}
        decision = {"precision": choose(rates), "rates": rounded}
    decision = {
        **decision,
        "seconds": round(time.perf_counter() - started, 2),
        "threads": _threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # Read again just before writing: another process may have stored decisions meanwhile, and theirs win.
    decisions = stored_decisions(workload.cache_root, identity, lambda message: None)
    decision = decisions.setdefault(workload.label, decision)
    path = calibration_path(workload.cache_root, identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json_atomic(path, {"identity": identity, "decisions": decisions})
    how = f"measured once in {decision['seconds']:.1f} s" if decision["rates"] else "not measured"
    log(f"[calibration] {workload.label}: {describe(decision)} -> {decision['precision']} ({how}, stored in {path})")
    return decision["precision"]


def describe(decision: dict) -> str:
    """The evidence behind a stored decision: its measured rates, or the rule that made it."""
    if decision.get("rates"):
        return ", ".join(f"{precision} {rate:.1f} img/s" for precision, rate in decision["rates"].items())
    return decision.get("rule", "no measurement")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --- the stages' workloads: the model each stage runs, built as it builds it, with random weights ---


def features_workload(config, name: str, cache_root: Path) -> Workload:
    """The features stage's extraction of backbone `name` (also predict's frozen arms)."""
    from . import backbones, cpu_rewrites, transforms

    spec = backbones.get_backbone(name)

    def build(precision: str):
        model = backbones.build_backbone(name, pretrained=False)
        backbones.strip_head(model, spec)
        model.requires_grad_(False)
        return cpu_rewrites.for_inference(model.eval(), name, config.features.fold_batchnorm)

    input_size = transforms.crop_sizes(spec.preprocessing, config.features.input_size)[1]
    return _workload(config, name, "inference", config.features.batch_size, input_size, cache_root, build)


def finetune_workload(config, name: str, cache_root: Path) -> Workload:
    """One fine-tuning step of backbone `name` at the [finetune] batch and input size."""
    from . import backbones, cpu_rewrites, models

    settings = config.finetune

    def build(precision: str):
        model, _ = models.build_finetune_model(name, config.data.num_classes, pretrained=False)
        cpu_rewrites.rewrite_for_finetuning(model, name, settings)
        return _trained(model, precision, config.runtime.float32_depthwise)

    input_size = settings.input_size or backbones.get_backbone(name).preprocessing.input_size
    return _workload(config, name, "training", settings.batch_size, input_size, cache_root, build)


def cnn_workload(config, cache_root: Path) -> Workload:
    """One training step of the scratch CNN at the [cnn] batch and input size."""
    from . import models

    settings = config.cnn
    input_size = settings.input_size or models.SCRATCH_PREPROCESSING.input_size

    def build(precision: str):
        model = models.build_scratch_model(settings, config.data.num_classes, input_size)
        return _trained(model, precision, config.runtime.float32_depthwise)

    model = f"cnn:{settings.architecture}"
    return _workload(config, model, "training", settings.batch_size, input_size, cache_root, build)


def _trained(model, precision: str, float32_depthwise: bool):
    """`model` in train mode with cpu_rewrites.for_training's bf16-only rewrite, as the stage applies it."""
    from . import cpu_rewrites

    if float32_depthwise and precision == "bf16":
        cpu_rewrites.train_depthwise_in_float32(model)
    return model.train()


def _workload(config, model: str, use: str, batch_size: int, input_size: int, cache_root: Path, build) -> Workload:
    return Workload(model, use, batch_size, input_size, config.runtime.channels_last, Path(cache_root), build)
