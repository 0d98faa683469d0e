"""The cnn stage: a CNN trained from scratch on the training split (the "scratch" arm).

One unit named by [cnn] architecture ("bn-cnn", or "notebook" for the reconstructed original net),
keyed by the [cnn] settings, the number of classes, the seed, the precision and the device type.
The architectures live in pipeline/models.py; the loop is pipeline/train.py, shared with fine-tuning.
"""

from __future__ import annotations

from . import checkpoints, cpu_rewrites, distributed, images, results, train
from .calibration import cnn_workload
from .config import Config
from .download import load_index
from .evaluate import finish_arm
from .graph import BuildContext, BuildResult, Stage, Unit, register_stage
from .models import SCRATCH_PREPROCESSING, build_scratch_model
from .runtime import Timings, plan_runtime, resolve_runtime, seed_everything
from .transforms import crop_sizes

CODE_VERSION = "2"  # 2: predictions.npz


def plan(config: Config, graph) -> list[Unit]:
    distributed.check_batch_size("cnn", config.cnn.batch_size)
    runtime = plan_runtime(config.runtime, cnn_workload(config, graph.cache_root))
    return [
        Unit(
            stage="cnn",
            name=config.seeded_name(results.scratch_unit(config.cnn.architecture), seed),
            code_version=CODE_VERSION,
            settings={
                "cnn": config.section("cnn"),
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


def build(context: BuildContext) -> BuildResult:
    config = context.config
    settings = config.cnn
    architecture = config.cnn.architecture
    runtime = resolve_runtime(config.runtime, cnn_workload(config, context.cache_root))
    seed_everything(runtime.seed)  # the initial weights come from this seed
    timings = Timings(runtime)
    input_size = settings.input_size or SCRATCH_PREPROCESSING.input_size
    stored_size = settings.stored_size or crop_sizes(SCRATCH_PREPROCESSING, input_size)[0]
    with timings.phase("data"):
        index = load_index(context.input_directory("download"))
        folder = images.store_folder(context.cache_root, context.unit.input("download").key, stored_size)
        sets = images.load_image_sets(index, folder, stored_size, SCRATCH_PREPROCESSING, input_size, context.log)
    model = build_scratch_model(settings, config.data.num_classes, input_size)
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
