"""The cnn stage: a CNN trained from scratch on the training split (the "scratch" arm).

One unit named by [cnn] architecture ("bn-cnn", or "notebook" for the reconstructed original net),
keyed by the [cnn] settings, the number of classes, the seed, the precision and the device type.
The architectures live in pipeline/models.py; the loop is pipeline/train.py, shared with fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import checkpoints, cpu_rewrites, data, distributed, images, results, train
from ..calibration import cnn_workload
from ..config import Config
from ..datasets import typical_side
from ..evaluate import finish_arm
from ..graph import BuildContext, BuildResult, Stage, Unit, register_stage
from ..models import SCRATCH_PREPROCESSING, build_scratch_model
from ..runtime import Timings, plan_runtime, resolve_runtime, seed_everything
from ..training_settings import keyed_section
from ..transforms import crop_sizes

# 2: predictions.npz; eval pixels are extraction's (pipeline/pixels.py), random crops rounded to uint8;
# input and stored size left at 0 follow the data's image size
CODE_VERSION = "2"


def plan(config: Config, graph) -> list[Unit]:
    distributed.check_batch_size("cnn", config.cnn.batch_size)
    runtime = plan_runtime(config.runtime, cnn_workload(config, graph.cache_root))
    return [
        Unit(
            stage="cnn",
            name=config.seeded_name(results.scratch_unit(config.cnn.architecture), seed),
            code_version=CODE_VERSION,
            settings={
                "cnn": keyed_section(config.section("cnn")),
                "num_classes": config.data.num_classes,
                "seed": seed,
                "precision": runtime.precision,
                "device": runtime.device_type,
            },
            inputs=(("download", graph.units("download")[0]),),
            seed=seed,
        )
        for seed in config.run_seeds()
    ]


def scratch_sizes(settings, index) -> tuple[int, int]:
    """Input crop and stored side; each left at 0 follows the data: its typical image side, at most 224 / 256.

    A scratch network has no native resolution, so small images (64 px thumbnails) are used as they are
    rather than upscaled, and large ones are cropped at the usual ImageNet sizes.
    """
    side = typical_side(index) if not (settings.input_size and settings.stored_size) else 0
    input_size = settings.input_size or min(SCRATCH_PREPROCESSING.input_size, side)
    stored_size = settings.stored_size or min(crop_sizes(SCRATCH_PREPROCESSING, input_size)[0], max(side, input_size))
    return input_size, stored_size


def build(context: BuildContext, choose_train: Callable | None = None, extra: dict | None = None) -> BuildResult:
    """Train the scratch CNN; the curves stage passes `choose_train` (its subset of the training images)
    and the `extra` fields its result.json adds."""
    config = context.config
    settings = config.cnn
    architecture = config.cnn.architecture
    runtime = resolve_runtime(config.runtime, cnn_workload(config, context.cache_root))
    seed_everything(runtime.seed)  # the initial weights come from this seed
    timings = Timings(runtime)
    with timings.phase("data"):
        index = data.load_index(context.input_directory("download"))
        input_size, stored_size = scratch_sizes(settings, index)
        folder = images.store_folder(context.cache_root, context.unit.input("download").key)
        sets = images.load_image_sets(index, folder, stored_size, SCRATCH_PREPROCESSING, input_size, context.log)
        if choose_train is not None:
            sets["train"] = sets["train"].subset(choose_train)
    # The data's class count: [data] num_classes may be 0 ("from the data") for other dataset kinds.
    model = build_scratch_model(settings, len(index.class_names), input_size)
    cpu_rewrites.for_training(model, runtime, settings, architecture)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    context.log(f"[cnn] {architecture}: {parameters / 1e6:.2f} M parameters at {input_size} px")
    checkpoint = context.directory / checkpoints.CHECKPOINT
    resume = checkpoints.read_checkpoint(checkpoint, context.unit.key, context.log)
    job = train.FitJob(checkpoint, context.unit.key, label=f"cnn {architecture}", log=context.log, resume=resume)
    groups = [{"name": "model", "params": list(model.parameters()), "lr_scale": 1.0}]
    result = train.fit(model, groups, sets["train"], sets["val"], settings, runtime, job)
    record = {
        "arm": results.scratch_arm(architecture),
        "method": results.SCRATCH,
        "backbone": architecture,
        "head": results.SCRATCH_HEAD,
        "input_size": input_size,
        "stored_size": stored_size,
        "train_images": len(sets["train"]),
        "class_names": index.class_names,
        "selected": {"best_epoch": result.best_epoch},
        "parameters": parameters,
        **(extra or {}),
    }
    phases = {"data_seconds": timings.seconds.get("data", 0.0)}
    return finish_arm(
        context, model, result, sets["test"], runtime, record, phases, test_image_ids=index.image_ids["test"]
    )


STAGE = register_stage(
    Stage(
        name="cnn",
        description="Train a CNN from scratch (best epoch on val).",
        code_version=CODE_VERSION,
        plan=plan,
        build=build,
        distributed=True,
    )
)
