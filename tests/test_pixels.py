"""The one pixel path (pipeline/pixels.py): decoding, uint8 geometry and normalisation, and the same eval
pixels for every arm: extraction, the end-to-end arms' image cache and predict."""

from __future__ import annotations

import pickle

import numpy
import pytest
import torch
from helpers import make_tiny_config

from pipeline import backbones, pixels, transforms


@pytest.mark.parametrize(
    "mean, std",
    [
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # scalar operands
        ((0.3, 0.3, 0.3), (0.7, 0.7, 0.7)),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)  # per channel
def test_batch_normalisation_is_totensor_and_normalize_bit_for_bit(mean, std):
    from torchvision import transforms as tv

    batch = torch.from_numpy(numpy.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=numpy.uint8))
    batch[0].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every value, in every channel
    batch[1].view(-1)[: 256 * 3] = torch.arange(256, dtype=torch.uint8).repeat_interleave(3)
    reference = tv.Compose([tv.ToTensor(), tv.Normalize(mean, std)])
    expected = torch.stack([reference(image.numpy()) for image in batch])
    normalised = pixels.normalise(batch, mean, std)
    assert normalised.dtype == torch.float32 and normalised.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalised, expected)


def test_geometry_runs_on_uint8_tensors_within_one_level_of_pil():
    """The uint8 part resamples decoded tensors (torchvision v2): PIL's pixels bit for bit at a whole-number
    scale, at most one level away otherwise, the same random crops per seed, and PIL for steps it cannot mirror."""
    from PIL import Image
    from torchvision import transforms as tv

    preprocessing = backbones.get_backbone("tiny-resnet").preprocessing
    image = Image.fromarray(numpy.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=numpy.uint8))

    def pil_pixels(transform):
        return torch.from_numpy(numpy.array(tv.Compose(transform.transforms[:-2])(image)))

    for size, whole in ((48, True), (36, False)):  # shorter side 24 -> 48 (x2) and -> 36 (x1.5)
        transform = transforms.eval_transform(preprocessing, size)
        geometry, mean, std = pixels.uint8_transform(transform)
        assert (mean, std) == (tuple(preprocessing.mean), tuple(preprocessing.std))
        ours, expected = geometry(image), pil_pixels(transform)
        assert ours.shape == expected.shape == (size, size, 3) and ours.dtype == torch.uint8
        difference = (ours.int() - expected.int()).abs().max().item()
        assert difference == 0 if whole else difference <= 1
    views = transforms.train_transform(preprocessing, 16, "crop-flip")
    augmented, _, _ = pixels.uint8_transform(views)
    for seed in range(5):  # the same crop and flip draws as PIL's pipeline under one seed
        torch.manual_seed(seed)
        ours = augmented(image)
        torch.manual_seed(seed)
        assert ours.shape == (16, 16, 3) and (ours.int() - pil_pixels(views).int()).abs().max().item() <= 1
    # A step without a uint8-tensor twin keeps the whole pipeline on PIL, bit for bit.
    policy = transforms.train_transform(preprocessing, 16, "trivialaugment")
    on_pil, _, _ = pixels.uint8_transform(policy)
    torch.manual_seed(5)
    ours = on_pil(image)
    torch.manual_seed(5)
    assert torch.equal(ours, pil_pixels(policy))


def test_augmented_views_resample_a_row_major_crop_to_the_same_pixels_as_v2():
    """The crop is copied into [H, W, 3] rows before resampling, so the view leaves as [H, W, 3] rows (no
    transpose when stacked) with v2.RandomResizedCrop's pixels and draws under the same seed."""
    from torchvision.transforms import v2

    preprocessing = backbones.get_backbone("tiny-resnet").preprocessing
    views = transforms.train_transform(preprocessing, 40, "crop-flip")
    augmented, _, _ = pixels.uint8_transform(views)
    crop = next(step for step in augmented.transforms if isinstance(step, pixels.RowMajorResizedCrop))
    plain = v2.RandomResizedCrop(
        crop.crop.size, crop.crop.scale, crop.crop.ratio, crop.crop.interpolation, crop.crop.antialias
    )
    image = pixels.image_tensor_of(numpy.random.default_rng(2).integers(0, 256, (29, 37, 3), dtype=numpy.uint8))
    for seed in range(8):
        torch.manual_seed(seed)
        ours = crop(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, plain(image))
        assert pixels.pixel_rows(ours).is_contiguous()
    # DataLoader workers started by spawn get the pipeline pickled.
    torch.manual_seed(0)
    expected = augmented(image)
    torch.manual_seed(0)
    assert torch.equal(pickle.loads(pickle.dumps(augmented))(image), expected)


@pytest.mark.parametrize("mode, suffix", [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGB", "png")])
def test_tensor_pipelines_read_jpegs_with_simplejpeg_to_pils_pixels(tmp_path, mode, suffix):
    """A colour or greyscale JPEG is decoded by simplejpeg for uint8-tensor pipelines, to PIL's RGB pixels bit for
    bit and in [H, W, 3] rows; anything else (CMYK JPEGs, PNGs) is read by PIL."""
    from PIL import Image

    rng = numpy.random.default_rng(3)
    source = rng.integers(0, 256, (30, 41, 3), dtype=numpy.uint8)
    path = tmp_path / f"image.{suffix}"
    Image.fromarray(source).convert(mode).save(path)
    with Image.open(path) as image:
        expected = torch.from_numpy(numpy.array(image.convert("RGB")))
    read = pixels.read_rgb(path, tensor=True)
    assert isinstance(read, torch.Tensor) == (suffix == "jpg" and mode != "CMYK")
    rows = pixels.image_tensor_of(read)
    assert torch.equal(pixels.pixel_rows(rows), expected) and pixels.pixel_rows(rows).is_contiguous()
    assert not isinstance(pixels.read_rgb(path), torch.Tensor)  # PIL pipelines keep getting PIL images


def test_a_truncated_jpeg_is_named_whichever_decoder_reads_it(tmp_path):
    from PIL import Image

    path = tmp_path / "image_00007.jpg"
    Image.fromarray(numpy.zeros((40, 40, 3), dtype=numpy.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    for tensor in (True, False):
        with pytest.raises(pixels.ImageReadError, match="image_00007.jpg"):
            pixels.read_rgb(path, tensor=tensor)


# (width, height, mode, format): smaller and larger than the crops, both aspects, every kind of decoding.
FAKE_IMAGES = [
    (37, 29, "RGB", "JPEG"),
    (29, 61, "L", "JPEG"),
    (50, 50, "CMYK", "JPEG"),
    (64, 40, "RGBA", "PNG"),
    (23, 31, "P", "PNG"),
    (120, 45, "RGB", "PNG"),
    (12, 90, "RGB", "JPEG"),
]


class Recorder(torch.nn.Module):
    """A stand-in model that keeps every batch it is fed and returns zeros."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs, self.inputs = outputs, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        self.inputs.append(batch.detach().clone())
        return torch.zeros(len(batch), self.outputs)

    def fed(self) -> torch.Tensor:
        fed, self.inputs = torch.cat(self.inputs), []
        return fed


@pytest.mark.parametrize(
    "interpolation, input_size, resize_size", [("bilinear", 20, 23), ("bicubic", 24, 24), ("bilinear", 16, 40)]
)
def test_every_arm_is_fed_the_same_eval_pixels_bit_for_bit(tmp_path, interpolation, input_size, resize_size):
    """Frozen extraction's input == the end-to-end arms' eval batches (val, test and train) == predict's input,
    frozen and end to end, for the same image and input size."""
    import dataclasses

    from PIL import Image

    from pipeline import data, extract, frozen, images, predict, train
    from pipeline.runtime import Runtime

    folder = tmp_path / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    rng = numpy.random.default_rng(7)
    for image_id, (width, height, mode, kind) in enumerate(FAKE_IMAGES, start=1):
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=numpy.uint8), "RGBA")
        picture = picture.convert("RGB").quantize(16) if mode == "P" else picture.convert(mode)
        picture.save(data.image_path(folder, image_id), kind)  # every file named .jpg, as the dataset's are
    ids = numpy.arange(1, len(FAKE_IMAGES) + 1)
    index = data.DatasetIndex(folder, ["only"], dict.fromkeys(data.SPLITS, ids), dict.fromkeys(data.SPLITS, ids * 0))
    preprocessing = backbones.Preprocessing(input_size, resize_size, interpolation, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    spec = dataclasses.replace(backbones.get_backbone("tiny-resnet"), preprocessing=preprocessing)
    config = make_tiny_config(tmp_path, tmp_path / "cache")
    runtime = Runtime(device="cpu", precision="fp32", channels_last=True, num_workers=0, seed=0)
    model = Recorder(spec.feature_dim)

    jobs = frozen.extraction_jobs(index, config, spec, input_size)[:3]
    extract.write_features(
        tmp_path / "features.h5",
        "key",
        jobs,
        model,
        spec.feature_dim,
        runtime,
        extract.ExtractionOptions(batch_size=3, log=lambda line: None, progress=False),
        attributes={},
    )
    extracted = model.fed().split(len(ids))  # train, val, test in job order
    sets = images.load_image_sets(index, tmp_path / "images", 10, preprocessing, input_size, log=lambda line: None)
    for split, extracted_split in zip(data.SPLITS, extracted, strict=True):
        train.predict(model, sets[split], runtime, batch_size=4)
        assert torch.equal(model.fed(), extracted_split), split
    assert torch.equal(sets["train"].train_batch(torch.arange(len(ids)), "none", 0.5, None), extracted[0])
    paths = index.paths("test")
    predict.frozen_features_of(model, paths, preprocessing, input_size, runtime, batch_size=2)
    assert torch.equal(model.fed(), extracted[2])
    predict.end_to_end_logits_of(model, paths, preprocessing, input_size, runtime, batch_size=5)
    assert torch.equal(model.fed(), extracted[2])
    # The float batches are normalised uint8 crops at the input size: the same pixels, not just close ones.
    rows = sets["test"].rows[torch.arange(len(ids))]
    assert rows.dtype == torch.uint8 and rows.shape == (len(ids), input_size, input_size, 3)
    assert torch.equal(pixels.normalise(rows, preprocessing.mean, preprocessing.std), extracted[2])
