"""`precision = "auto"` and `engine = "auto"` on CPU, decided by a short measurement on the machine at hand and stored.

Whether bf16 autocast beats fp32 on a CPU depends on the processor and on the network: on one Xeon
(avx512_bf16, no AMX) bf16 ran EfficientNet-Lite0 faster and ResNet-18 slower, so no instruction-set
rule picks right for both. Likewise whether onnxruntime (onnx_engine.py, fp32) runs a frozen backbone
faster than torch. The first plan that needs a workload's choice (a backbone or CNN, used for
inference or for a training step, at the stage's batch and input size) times its options on random
inputs (measure_rates: a warm-up step, then a few alternating timed steps, median) and stores the
decision with its rates in `<cache root>/calibration/<machine>.json`, keyed by the machine's
identity (CPU model, the flags that matter, core count, torch version). The choice enters unit
keys, so a stored decision always wins over a new measurement among the same options: measuring
again on the same machine could flip a near tie and rebuild caches. A different machine identity
gets its own file and measures again; so does a workload whose options changed (onnxruntime
installed or removed, a precision or engine set by hand). The options: "bf16" and "fp32" in torch,
and for inference "onnxruntime" where it is installed. On a CPU whose flags show no bf16
instructions (AVX2-only x86, ARM without bf16) bf16 is emulated and is no option: emulated bf16 lost
to fp32 several times over on every workload measured, and timing it was a cold run's largest fixed
cost (docs/benchmarks.md, Precision calibration). A single option left is stored without timing.
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

from . import atomic, onnx_engine
from .config import ConfigError

FOLDER = "calibration"
CANDIDATES = ("bf16", "fp32")  # torch precisions
ONNXRUNTIME = "onnxruntime"  # the other engine's option, in fp32
ENGINES = ("torch", ONNXRUNTIME)
WARMUP_STEPS = 1
TIMED_STEPS = 5
MINIMUM_TIMED_STEPS = 3
BUDGET_SECONDS = 10.0
CLEAR_RATIO = 2.0  # one timed step each decides when one option is this many times slower
SCREEN_RATIO = 5.0  # the warm-up steps alone decide when one is this many times slower
# bf16 rounds activations, so it has to win clearly; a near tie keeps the exact fp32.
BF16_MARGIN = 1.05
# onnxruntime's fp32 equals torch's to rounding, but a near tie keeps the engine with fewer moving parts.
ENGINE_MARGIN = 1.05
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
            decision["precision"] in CANDIDATES and decision.get("engine", "torch") in ENGINES
            for decision in record["decisions"].values()
        ):
            raise ValueError("its content does not match this machine")
        return record["decisions"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"[calibration] ignoring damaged {path} ({type(error).__name__}: {error}); measuring again")
        return {}


def measure_rates(workload: Workload, options: tuple[str, ...] = CANDIDATES) -> dict[str, float]:
    """Images per second of one workload step in each option (a torch precision, or "onnxruntime").

    After WARMUP_STEPS of each, the candidates' steps alternate, so a change in the machine's load
    slows both alike; each rate is the median of its timed steps: TIMED_STEPS, or fewer (never under
    MINIMUM_TIMED_STEPS) once BUDGET_SECONDS have passed, for slow workloads on busy machines, or
    just one when the first already differ CLEAR_RATIO times, or none when the warm-up steps differ
    SCREEN_RATIO times (emulated bf16 ran Lite0 15x slower than fp32 on an AVX2-only EPYC).
    """
    steps = {option: _step(workload, option) for option in options}
    warmup: dict[str, list[float]] = {option: [] for option in options}
    for precision, step in steps.items():
        for _ in range(WARMUP_STEPS):
            begun = time.perf_counter()
            step()
            warmup[precision].append(time.perf_counter() - begun)
    if _clear(warmup, SCREEN_RATIO):
        # So far apart that one-off kernel set-up cannot explain it: timing more would only cost.
        return {precision: workload.batch_size / min(times) for precision, times in warmup.items()}
    seconds: dict[str, list[float]] = {option: [] for option in options}
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


def _step(workload: Workload, option: str) -> Callable[[], None]:
    """One batch of `workload` in `option` on random inputs: a forward pass, or a whole training step."""
    import torch

    precision = "fp32" if option == ONNXRUNTIME else option
    model = workload.build(precision)
    inputs = torch.randn(workload.batch_size, 3, workload.input_size, workload.input_size)
    if option == ONNXRUNTIME:
        model = onnx_engine.OnnxBackbone(model, workload.input_size)
    elif workload.channels_last:
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


def options_for(workload: Workload, precision: str = "auto", engine: str = "auto") -> tuple[str, ...]:
    """The ways `workload` may run on this CPU under the [runtime] `precision` and `engine` settings."""
    precisions = CANDIDATES if precision == "auto" else (precision,)
    engines = ENGINES if engine == "auto" else (engine,)
    if workload.use != "inference":
        engines = ("torch",)  # training is always torch's
    # Emulated bf16 is no option, unless asked for by name.
    emulated = precision == "auto" and native_bf16() is False
    options = []
    if "torch" in engines:
        options += [name for name in precisions if not (name == "bf16" and emulated)]
    if ONNXRUNTIME in engines and "fp32" in precisions:
        if engine == ONNXRUNTIME:
            onnx_engine.require()
        if onnx_engine.available():
            options.append(ONNXRUNTIME)
    if not options:
        raise ConfigError(f"[runtime] engine = {engine!r} computes in fp32; set precision = 'fp32' or 'auto'")
    return tuple(options)


def choose(rates: dict[str, float]) -> str:
    """The option to use: bf16 only where it clearly beats fp32, then onnxruntime where it beats that."""
    torch_options = [name for name in CANDIDATES if name in rates]
    best = torch_options[0] if len(torch_options) == 1 else None
    if len(torch_options) == 2:
        best = "bf16" if rates["bf16"] > BF16_MARGIN * rates["fp32"] else "fp32"
    if ONNXRUNTIME in rates and (best is None or rates[ONNXRUNTIME] > ENGINE_MARGIN * rates[best]):
        return ONNXRUNTIME
    return best


def as_choice(decision: dict) -> tuple[str, str]:
    """(precision, engine) of a stored decision."""
    return decision["precision"], decision.get("engine", "torch")


def _stored_options(decision: dict) -> tuple[str, ...]:
    # Decisions from before onnxruntime was an option name none: theirs were the rates timed, or fp32 alone.
    return tuple(decision.get("options") or decision.get("rates") or ("fp32",))


def decide(workload: Workload, options: tuple[str, ...], log: Callable[[str], None] = print) -> tuple[str, str]:
    """(precision, engine) for `workload` among `options`: the stored decision, or a new one, stored before use."""

    identity = machine_identity()
    decision = stored_decisions(workload.cache_root, identity, log).get(workload.label)
    if decision is not None and _stored_options(decision) == options:
        return as_choice(decision)
    started = time.perf_counter()
    if len(options) == 1:
        emulated = options == ("fp32",) and native_bf16() is False
        rule = "no bf16 instructions: bf16 is emulated" if emulated else "the only option [runtime] allows"
        decision = {"option": options[0], "rates": {}, "rule": rule}
    else:
        rates = measure_rates(workload, options)
        rounded = {option: round(rate, 2) for option, rate in rates.items()}
        decision = {"option": choose(rates), "rates": rounded}
    option = decision.pop("option")
    decision = {
        "precision": "fp32" if option == ONNXRUNTIME else option,
        "engine": ONNXRUNTIME if option == ONNXRUNTIME else "torch",
        **decision,
        "options": list(options),
        "seconds": round(time.perf_counter() - started, 2),
        "threads": _threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if decision["engine"] == ONNXRUNTIME:
        decision["onnxruntime"] = onnx_engine.version()
    # Read again just before writing: another process may have stored decisions meanwhile, and theirs win.
    decisions = stored_decisions(workload.cache_root, identity, lambda message: None)
    stored = decisions.get(workload.label)
    if stored is None or _stored_options(stored) != options:
        decisions[workload.label] = decision
    decision = decisions[workload.label]
    path = calibration_path(workload.cache_root, identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json_atomic(path, {"identity": identity, "decisions": decisions})
    how = f"measured once in {decision['seconds']:.1f} s" if decision["rates"] else "not measured"
    log(f"[calibration] {workload.label}: {describe(decision)} -> {chosen(decision)} ({how}, stored in {path})")
    return as_choice(decision)


def chosen(decision: dict) -> str:
    """How a stored decision runs its workload, in words: "bf16", "fp32" or "onnxruntime fp32"."""
    precision, engine = as_choice(decision)
    return precision if engine == "torch" else f"{engine} {precision}"


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
