"""The notebook's protocol, replicated: its dataset (JPEG decoded every access), transforms, DataLoader,
SGD steps and head recipe, and the timing of its frozen arm and fine-tuning loop."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy
import torch
from torch import nn

from .. import backbones, evaluate, transforms
from ..data import DatasetIndex
from ..runtime import Runtime
from .options import BenchError
from .protocol import (
    NOTEBOOK_BATCH,
    NOTEBOOK_EPOCHS,
    NOTEBOOK_GAMMA,
    NOTEBOOK_LR,
    NOTEBOOK_MOMENTUM,
    NOTEBOOK_STEP_SIZE,
    WARMUP_STEPS,
)
from .subsets import evenly_spaced


class LabelledImages(torch.utils.data.Dataset):
    """(tensor, label) from a JPEG decoded and transformed on every access, as the notebook's loaders did."""

    def __init__(self, paths: list, labels, transform):
        self.paths, self.labels, self.transform = list(paths), numpy.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        from PIL import Image

        with Image.open(self.paths[position]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[position])


def notebook_train_transform(spec: backbones.BackboneSpec, input_size: int):
    """The notebook's training augmentation: torchvision's RandomResizedCrop defaults and a flip."""
    from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

    return Compose(
        [
            RandomResizedCrop(input_size),
            RandomHorizontalFlip(),
            ToTensor(),
            Normalize(spec.preprocessing.mean, spec.preprocessing.std),
        ]
    )


def timed_loop(loader, step: Callable, runtime: Runtime) -> tuple[int, float]:
    """(images timed, seconds) of `step` over a loader; the first WARMUP_STEPS batches only warm up."""
    counted, started = 0, None
    for number, (inputs, labels) in enumerate(loader, start=1):
        step(inputs.to(runtime.device), labels.to(runtime.device))
        runtime.synchronize()
        if number == WARMUP_STEPS:
            started = time.perf_counter()
        elif number > WARMUP_STEPS:
            counted += len(labels)
    if not counted:
        raise BenchError("too few images to time past the warm-up batch; raise --notebook-images or --steps")
    return counted, time.perf_counter() - started


def notebook_loader(paths, labels, transform, runtime: Runtime, seed: int):
    return torch.utils.data.DataLoader(
        LabelledImages(paths, labels, transform),
        batch_size=NOTEBOOK_BATCH,
        shuffle=True,
        num_workers=runtime.num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def time_notebook_frozen(
    name: str, weights: str | None, index: DatasetIndex, input_size: int, count: int, runtime: Runtime, seed: int
) -> dict:
    """Seconds per image of the notebook's frozen arm: fp32, batch 4, JPEG + transforms every epoch, SGD head."""
    spec = backbones.get_backbone(name)
    model = backbones.build_backbone(
        name, pretrained=weights is not None, weights_path=weights, num_classes=len(index.class_names)
    ).to(runtime.device)
    model.requires_grad_(False)
    head = backbones.get_head(model, spec).requires_grad_(True)
    train_step = notebook_sgd_step(model, head.parameters())

    def val_step(inputs, labels):
        with torch.no_grad():
            model(inputs)

    picks = {split: evenly_spaced(len(index.image_ids[split]), count) for split in ("train", "val")}
    timed = {}
    for split, mode, step, transform in (
        ("train", True, train_step, notebook_train_transform(spec, input_size)),
        ("val", False, val_step, transforms.eval_transform(spec.preprocessing, input_size)),
    ):
        model.train(mode)
        every = index.paths(split)
        paths = [every[position] for position in picks[split]]
        loader = notebook_loader(paths, index.labels[split][picks[split]], transform, runtime, seed)
        timed[split] = timed_loop(loader, step, runtime)
    return {f"{split}_seconds_per_image": seconds / images for split, (images, seconds) in timed.items()} | {
        f"{split}_images_timed": images for split, (images, _) in timed.items()
    }


def train_notebook_head(
    views: numpy.ndarray, train_labels, val: tuple, test: tuple, num_classes: int, seed: int
) -> dict:
    """The notebook's head recipe on cached features: SGD 0.001 momentum 0.9, batch 4, StepLR(7, 0.1), 25 epochs.

    Epoch e trains on augmented view e mod K of every image (K = len(views)); the head of the
    best val epoch is tested, as a per-epoch-val training loop that keeps its best weights does.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(views.shape[-1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=NOTEBOOK_LR, momentum=NOTEBOOK_MOMENTUM)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=NOTEBOOK_STEP_SIZE, gamma=NOTEBOOK_GAMMA)
    criterion = nn.CrossEntropyLoss()
    labels = torch.as_tensor(train_labels, dtype=torch.int64)
    val_inputs, test_inputs = torch.from_numpy(val[0]), torch.from_numpy(test[0])
    best = (-1.0, 0, None)
    for epoch in range(NOTEBOOK_EPOCHS):
        inputs = torch.from_numpy(views[epoch % len(views)])
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), NOTEBOOK_BATCH):
            batch = order[start : start + NOTEBOOK_BATCH]
            optimizer.zero_grad()
            criterion(head(inputs[batch]), labels[batch]).backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            val_top1 = float((head(val_inputs).argmax(1).numpy() == val[1]).mean())
        if val_top1 > best[0]:
            best = (val_top1, epoch + 1, {key: value.clone() for key, value in head.state_dict().items()})
    head.load_state_dict(best[2])
    with torch.no_grad():
        predictions = head(test_inputs).argmax(1).numpy()
    return {
        "val_top1": best[0],
        "best_epoch": best[1],
        "test_top1": evaluate.classification_metrics(test[1], predictions, num_classes)["top1"],
    }


def notebook_sgd_step(model: nn.Module, parameters) -> Callable:
    """One notebook training step (SGD 0.001, momentum 0.9, cross-entropy) over `parameters`."""
    optimizer = torch.optim.SGD(parameters, lr=NOTEBOOK_LR, momentum=NOTEBOOK_MOMENTUM)
    criterion = nn.CrossEntropyLoss()

    def step(inputs, labels):
        optimizer.zero_grad()
        criterion(model(inputs), labels).backward()
        optimizer.step()

    return step


def time_notebook_steps(
    name: str, weights: str | None, index: DatasetIndex, input_size: int, count: int, runtime: Runtime, seed: int
) -> tuple[float, int]:
    """(seconds per image, images timed) of a notebook-style fine-tuning loop: fp32, batch 4, decode every step."""
    from ..models import build_finetune_model

    model, spec = build_finetune_model(name, len(index.class_names), weights_path=weights)
    model.to(runtime.device).train()
    step = notebook_sgd_step(model, model.parameters())
    picks = evenly_spaced(len(index.image_ids["train"]), count + WARMUP_STEPS * NOTEBOOK_BATCH)
    every = index.paths("train")
    paths = [every[position] for position in picks]
    loader = notebook_loader(
        paths, index.labels["train"][picks], notebook_train_transform(spec, input_size), runtime, seed
    )
    counted, seconds = timed_loop(loader, step, runtime)
    return seconds / counted, counted
