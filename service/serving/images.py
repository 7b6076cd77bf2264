"""Uploaded images → model inputs, by one documented rule.

1. Only PNG and JPEG are opened (Pillow, told the two formats, so no other decoder is reached).
   At most MAX_IMAGE_BYTES of file and MAX_IMAGE_PIXELS pixels: the size is read from the header
   and checked before any pixel is decoded, so a decompression bomb is refused for the cost of
   reading its header.
2. The EXIF orientation is applied (photos from phones); transparency is flattened onto white.
3. Converted to grayscale (ITU-R 601-2 luma, Pillow's "L") for a 1-channel model, RGB for 3.
4. Polarity: MNIST and Fashion-MNIST are light-on-dark (white strokes on black). With
   `invert="auto"` the image is inverted when its border (the outermost row and column of pixels
   on every side) is light on average (mean > 127), i.e. dark ink on white paper. `"true"` and
   `"false"` force it.
5. Letterboxed to the model's size: the longer side is resized to it (Lanczos), the shorter side
   scaled by the same factor and centred, the rest filled with black (the background after
   step 4). An image already of the model's size is used pixel for pixel.
6. Pixel values divided by 255, as in training.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_BYTES = 2 * 1024 * 1024  # a photo of a digit fits easily; MNIST-size PNGs are < 1 kB
MAX_IMAGE_PIXELS = 16_000_000  # 16 Mpx: decoded as RGB that is at most 48 MB
FORMATS = ("PNG", "JPEG")
BORDER_LIGHT_THRESHOLD = 127.0

Invert = Literal["auto", "true", "false"]


class ImageError(ValueError):
    """The upload is not an image we accept; the message says why."""


class ImageTooLarge(ImageError):
    """Over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    inverted: bool


def decode_image(
    data: bytes, input_shape: tuple[int, ...], invert: Invert = "auto"
) -> tuple[torch.Tensor, ImageInfo]:
    """float32 [1, *input_shape] in [0, 1] from PNG/JPEG bytes, by the rule in the module docstring."""
    channels, height, width = _target(input_shape)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    image, image_format = _open(data)
    pixels = np.asarray(_to_mode(image, "L" if channels == 1 else "RGB"), dtype=np.uint8)
    inverted = _should_invert(pixels, invert)
    if inverted:
        pixels = 255 - pixels
    fitted = _letterbox(Image.fromarray(pixels), width, height)
    array = np.asarray(fitted, dtype=np.float32) / 255.0
    array = array[None, :, :] if channels == 1 else array.transpose(2, 0, 1)  # channels first
    tensor = torch.from_numpy(np.ascontiguousarray(array)).reshape(1, *input_shape)
    info = ImageInfo(format=image_format, width=image.width, height=image.height, inverted=inverted)
    return tensor, info


def _target(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ImageError(f"this model's input {input_shape} is not an image (1 or 3 channels × H × W)")
    return input_shape[0], input_shape[1], input_shape[2]


def _open(data: bytes) -> tuple[Image.Image, str]:
    try:
        with warnings.catch_warnings():
            # Our own pixel cap is checked below; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("the file is not a PNG or JPEG image") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's plugins raise all three on bad headers
        raise ImageError(f"the image cannot be read: {exc}") from exc
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"image is {image.width}×{image.height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image), str(image.format)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the image cannot be decoded: {exc}") from exc


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def _should_invert(pixels: np.ndarray, invert: Invert) -> bool:
    if invert != "auto":
        return invert == "true"
    border = np.concatenate(
        [pixels[0].reshape(-1), pixels[-1].reshape(-1), pixels[:, 0].reshape(-1), pixels[:, -1].reshape(-1)]
    )
    return float(border.mean()) > BORDER_LIGHT_THRESHOLD


def _letterbox(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height), 0)
    canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas
