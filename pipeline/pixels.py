"""From an image file to the pixels a model sees: one path for every arm.

decode (libjpeg-turbo through simplejpeg for JPEGs, PIL for anything else) -> RGB (`to_rgb`, one rule
for every PIL mode) -> uint8 tensor -> resize the shorter side -> centre crop (eval) or random
resized crop and flip (augmented views) on uint8 tensors -> `normalise`, batched where the model runs.
Extraction, the end-to-end arms' image cache and predict all take their eval pixels from
`eval_pipeline`, so every arm of one backbone is tested on the same uint8 pixels, bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy
import torch

from .errors import PipelineError

JPEG_MAGIC = b"\xff\xd8"
# Modes whose alpha channel would be dropped by a plain convert("RGB"), showing whatever colour the
# transparent pixels happen to hold.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Backdrop for transparent pixels: cut-out photos are normally shown on white.
BACKDROP = (255, 255, 255, 255)
# JPEG colour spaces that libjpeg-turbo turns into PIL's RGB pixels; CMYK and YCCK go to PIL, whose
# conversion of them simplejpeg does not reproduce.
SIMPLEJPEG_COLOURSPACES = ("YCbCr", "Gray")


class ImageReadError(PipelineError, RuntimeError):
    """An image file that cannot be read or decoded."""


def decode_problem(path: str | Path) -> str | None:
    """Why the image at `path` does not decode cleanly, or None.

    JPEGs are decoded strictly, so data that libjpeg reports as corrupt but still turns into pixels
    (a warning PIL swallows) counts as a problem; the decode runs at a reduced DCT scale, which still
    reads the whole stream. Other formats are decoded completely by PIL.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    if data.startswith(JPEG_MAGIC):
        try:
            import simplejpeg
        except ImportError:
            simplejpeg = None
        if simplejpeg is not None:
            try:
                simplejpeg.decode_jpeg(data, strict=True, colorspace="RGB", min_height=8, min_width=8)
                return None
            except Exception as error:  # simplejpeg raises ValueError for corrupt data, others for odd files
                return f"{type(error).__name__}: {str(error)[:80]}"
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if data.startswith(JPEG_MAGIC):
                image.draft("RGB", (32, 32))
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        return f"{type(error).__name__}: {str(error)[:80]}"
    return None


def to_rgb(image):
    """A PIL image in RGB that keeps the picture, whatever its mode.

    - 16-bit and 32-bit integer greyscale (I;16*, I) is scaled from the 16-bit range when any value
      exceeds 255 (a plain convert would clip it to white); float greyscale (F) from [0, 1] when its
      values lie there.
    - Transparent pixels (alpha modes, palette or greyscale transparency) are composited over white.
    - Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) goes through PIL's own conversion.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = numpy.asarray(image, dtype=numpy.float64)
        high = float(values.max()) if values.size else 0.0
        if mode == "F" and high <= 1.0:
            scale = 255.0
        elif high > 255.0:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        grey = numpy.clip(numpy.rint(values * scale), 0, 255).astype(numpy.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        if mode == "La":
            image = _unpremultiplied_grey(image)  # PIL has no conversion out of premultiplied grey
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, BACKDROP)
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def _unpremultiplied_grey(image):
    """An La image (grey premultiplied by alpha) as LA."""
    from PIL import Image

    values = numpy.asarray(image, dtype=numpy.float64)
    grey, alpha = values[..., 0], values[..., 1]
    straight = numpy.where(alpha > 0, grey * 255.0 / numpy.maximum(alpha, 1.0), 0.0)
    planes = numpy.stack([numpy.clip(numpy.rint(straight), 0, 255), alpha], axis=-1).astype(numpy.uint8)
    return Image.fromarray(planes, "LA")


def open_rgb(path: str | Path):
    """The image at `path` as an RGB PIL image (loaded, file closed)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # the pixels must outlive the file, which closes on leaving the block
        return to_rgb(image)


def read_rgb(path, tensor: bool = False):
    """The image at `path` in RGB: a PIL image, or with `tensor` and a JPEG, a uint8 [3, H, W] view of [H, W, 3] rows.

    With `tensor`, a JPEG is decoded by simplejpeg (libjpeg-turbo): PIL's own RGB pixels (all 8,189
    Flowers-102 thumbnails bit for bit, greyscale included) in a sixth of PIL's time, with the GIL
    released, so extraction streams and cache builders decode in parallel. Any other file, or a JPEG
    it does not decode cleanly, goes through PIL, whose errors name the file.
    """
    if tensor:
        decoded = _decoded_jpeg(path)
        if decoded is not None:
            return decoded
    try:
        image = open_rgb(path)
    except OSError as error:
        raise ImageReadError(f"cannot read image {path} ({error}); replace it with the original file") from None
    return image


def load_pixels(path, pipeline: TensorPipeline) -> torch.Tensor:
    """The uint8 [H, W, 3] rows a tensor pipeline makes of the image at `path` (what extraction's dataset reads)."""
    return pipeline(read_rgb(path, tensor=True))


def _decoded_jpeg(path) -> torch.Tensor | None:
    """simplejpeg's RGB pixels as a [3, H, W] view of [H, W, 3] rows; None when it is not a JPEG it decodes.

    Strict decoding: a stream libjpeg warns about (truncated, corrupt data) goes to PIL, which either
    decodes it as it always did or says why not, so a file reads the same with or without simplejpeg.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError:
        return None  # PIL reports it
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        import simplejpeg

        if simplejpeg.decode_jpeg_header(data)[2] not in SIMPLEJPEG_COLOURSPACES:
            return None
        rows = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception:  # ImportError, or ValueError and others for data it refuses: PIL decodes it or says why not
        return None
    # Row-major like PIL's pixels, the layout the uint8 resampling keeps (see RowMajorResizedCrop).
    return torch.from_numpy(rows).permute(2, 0, 1)


def pixels_of(image) -> torch.Tensor:
    """PIL RGB image -> uint8 [H, W, 3] tensor in the image's own pixel order (no transpose)."""
    return torch.from_numpy(numpy.array(image, dtype=numpy.uint8))


def image_tensor_of(image) -> torch.Tensor:
    """PIL RGB image -> uint8 [3, H, W] view of its [H, W, 3] pixels (channels_last, no copy beyond PIL's);
    a tensor (read_rgb's decoded JPEG) passes through."""
    if isinstance(image, torch.Tensor):
        return image
    return pixels_of(image).permute(2, 0, 1)


def pixel_rows(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> [H, W, 3] view, the layout `normalise` takes once stacked."""
    return image.permute(1, 2, 0)


class RowMajorResizedCrop:
    """A v2.RandomResizedCrop (its parameters and random draws) that copies its crop into [H, W, 3] rows first.

    A crop of an [H, W, 3]-backed image is a strided view; torch's uint8 resampling then writes a
    [3, H, W] result, which stacking has to transpose back. Resampling a row-major crop writes row-major
    pixels, the same values (bit for bit on 300 real thumbnails, Lite0), and copying a small crop costs
    far less than that transpose.
    A plain class around the transform, so that it pickles for DataLoader workers.
    """

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        place = self.crop.make_params([image])
        crop = functional.crop(image, place["top"], place["left"], place["height"], place["width"])
        rows = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return functional.resize(rows, self.crop.size, self.crop.interpolation, antialias=self.crop.antialias)

    def __repr__(self) -> str:
        return f"RowMajorResizedCrop({self.crop})"


def _on_uint8_tensors(step):
    """The torchvision.transforms.v2 twin of a geometric step, run on uint8 tensors; None where it has none here."""
    from torchvision import transforms as tv
    from torchvision.transforms import v2

    if type(step) is tv.Resize:
        return v2.Resize(step.size, step.interpolation, step.max_size, step.antialias)
    if type(step) is tv.CenterCrop:
        return v2.CenterCrop(step.size)
    if type(step) is tv.RandomResizedCrop:
        return RowMajorResizedCrop(
            v2.RandomResizedCrop(step.size, step.scale, step.ratio, step.interpolation, step.antialias)
        )
    if type(step) is tv.RandomHorizontalFlip:
        return v2.RandomHorizontalFlip(step.p)
    return None


class TensorPipeline:
    """Geometric steps on uint8 tensors, from a PIL image or a decoded [3, H, W] tensor to [H, W, 3] rows.

    Its own type, so that ImageDataset knows it may hand over read_rgb's decoded JPEG instead of PIL.
    """

    def __init__(self, steps: list):
        self.transforms = steps

    def __call__(self, image) -> torch.Tensor:
        for step in self.transforms:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"TensorPipeline({self.transforms})"


def uint8_transform(transform) -> tuple[Callable, tuple, tuple]:
    """Split a torchvision pipeline ending in ToTensor + Normalize into a uint8 part and (mean, std).

    Workers then ship uint8 [H, W, 3] images (4x less to copy than float) and the float conversion
    and normalisation run batched where the model runs; the arithmetic (x / 255 - mean) / std is the same.
    The geometric steps run on the decoded uint8 tensor with their torchvision.transforms.v2 twins, whose
    native uint8 resampling costs less CPU than PIL's. Same geometry and random draws per seed, but where
    the scale is not a whole number a resampled pixel can differ from PIL's by one level (Lite2's
    64 -> 292 px). A pipeline with any other step stays on PIL.
    """
    from torchvision import transforms as tv

    steps = list(transform.transforms)
    if len(steps) < 2 or not isinstance(steps[-2], tv.ToTensor) or not isinstance(steps[-1], tv.Normalize):
        raise ValueError("expected a transform ending in ToTensor() and Normalize()")
    geometry = [_on_uint8_tensors(step) for step in steps[:-2]]
    if all(geometry):
        pixels = TensorPipeline([image_tensor_of, *geometry, pixel_rows])
    else:
        pixels = tv.Compose(steps[:-2] + [pixels_of])
    return pixels, tuple(steps[-1].mean), tuple(steps[-1].std)


def normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in channels_last memory, normalised as ToTensor + Normalize would.

    Stacked [H, W, 3] images already are channels_last once viewed as [N, 3, H, W], so no transpose
    is made, and the in-place steps repeat ToTensor + Normalize's operations in their order, so the
    values are bit for bit theirs (a transpose per image plus a channels_last copy per batch were most
    of this step's cost).
    """
    if images.device.type == "cpu" and len(set(mean)) == 1 and len(set(std)) == 1 and _scalars_exact(mean[0], std[0]):
        # One statistic for every channel (EfficientNet-Lite: 0.5 / 0.5): scalar operands instead of
        # broadcast [1, 3, 1, 1] tensors, which are slow over channels_last memory (a 256-entry lookup
        # table is slower too).
        return images.permute(0, 3, 1, 2).float().div_(255).sub_(mean[0]).div_(std[0])
    mean_tensor = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return images.permute(0, 3, 1, 2).float().div_(255).sub_(mean_tensor).div_(std_tensor)


@functools.lru_cache(maxsize=8)
def _scalars_exact(mean: float, std: float) -> bool:
    """Whether scalar operands give Normalize's broadcast-tensor results for all 256 pixel values.

    A CPU kernel may divide by a scalar through its reciprocal, which can round differently.
    """
    values = torch.arange(256, dtype=torch.uint8).float().div_(255)
    return torch.equal(
        values.clone().sub_(mean).div_(std), values.clone().sub_(torch.tensor([mean])).div_(torch.tensor([std]))
    )


def eval_pipeline(preprocessing, input_size: int = 0) -> tuple[TensorPipeline, tuple, tuple]:
    """The eval pixels of a recipe: decoded image -> uint8 [crop, crop, 3] rows, and (mean, std) for `normalise`.

    The very pipeline extraction derives from its eval jobs' transform (uint8_transform of
    transforms.eval_transform), so extraction, the end-to-end arms' eval batches and predict all
    feed a model these pixels.
    """
    from .transforms import eval_transform

    return uint8_transform(eval_transform(preprocessing, input_size))


def square_pipeline(size: int, interpolation: str) -> TensorPipeline:
    """Decoded image -> uint8 [size, size, 3] rows: the shorter side resized to `size`, centre-cropped square,
    with the eval path's own steps (the source of the end-to-end arms' random crops)."""
    from .transforms import resize_and_crop

    geometry = [_on_uint8_tensors(step) for step in resize_and_crop(size, size, interpolation)]
    return TensorPipeline([image_tensor_of, *geometry, pixel_rows])
