"""From an image file to RGB pixels: strict decoding checks and one conversion rule for every PIL mode.

Every path that reads an image (download verification, extraction, the end-to-end image cache,
predict) goes through `to_rgb`, so a picture is turned into RGB the same way wherever it is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy

JPEG_MAGIC = b"\xff\xd8"
# Modes whose alpha channel would be dropped by a plain convert("RGB"), showing whatever colour the
# transparent pixels happen to hold.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Backdrop for transparent pixels: cut-out photos are normally shown on white.
BACKDROP = (255, 255, 255, 255)


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
