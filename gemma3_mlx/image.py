"""Images for Gemma 3's vision tower: load, pan & scan, resize and normalize, as transformers does.

`preprocess_image` turns one image into the (1 + crops, S, S, 3) float32 mx.array the SigLIP encoder
takes (channels-last, MLX's convolution layout; `forward.logits(model, ids, pixels=...)` accepts it as is) and `image_prompt_text` the words that introduce
the crops. Pixels match transformers' Gemma3ImageProcessor (PIL backend): transparency composited
onto white, PIL bilinear resize of 8-bit pixels, then x / 127.5 - 1. Images under 2 pixels on a side are refused
(the reference would stretch one pixel over the whole frame). This module does not encode images, tokenize, or place image tokens.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, Gemma3Error
from .files import read_bytes

IMAGE_TOKEN = "<start_of_image>"


class ImageError(Gemma3Error):
    """An image that cannot be used: missing, not an image, truncated, empty or too large."""


MIN_SIDE = 2
MAX_IMAGE_BYTES = 256 << 20  # an uncompressed image at Pillow's pixel limit (89M pixels, RGB) is ~268 MB


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_size(im: Image.Image, name: str) -> None:
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"{name} is empty ({w}x{h} pixels)")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(f"{name} is too small ({w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageError(
            f"{name} is too large: {w}x{h} = {w * h} pixels exceeds Pillow's limit of {limit} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
        )


def _name(image_or_path) -> str:
    if isinstance(image_or_path, (str, Path)):
        return str(Path(image_or_path).expanduser())
    return "image bytes" if isinstance(image_or_path, (bytes, bytearray, memoryview)) else "image"


def _open(image_or_path) -> Image.Image:
    if isinstance(image_or_path, Image.Image):
        return image_or_path
    if isinstance(image_or_path, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(image_or_path)))
    if isinstance(image_or_path, (str, Path)):
        path = Path(image_or_path).expanduser()
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if not path.is_file():  # a directory, FIFO or device (/dev/zero would never end)
            raise ImageError(f"not an image file: {path}")
        # Size-capped before a byte is read; read whole, so no file handle is left open.
        return Image.open(io.BytesIO(read_bytes(path, MAX_IMAGE_BYTES, "an image file", ImageError)))
    raise ImageError(f"expected an image path, bytes or a PIL image, got {type(image_or_path).__name__}")


def _to_rgb(im: Image.Image) -> Image.Image:
    # As the reference's convert_to_rgb: any transparency is composited onto white; everything
    # else (L, I, I;16, F, P, CMYK, ...) goes through Pillow's convert, which clips I/I;16/F at 255.
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def load_image(image_or_path) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes or a PIL image, upright per its EXIF orientation."""
    name = _name(image_or_path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; _check_size makes that an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _open(image_or_path)
            _check_size(im, name)
            im.load()  # Image.open is lazy: decode now so a truncated file fails here
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large: {_one_line(e)}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or a format Pillow cannot read): {name}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageError(f"cannot read {name}: {_one_line(e)}") from None


def pan_and_scan_crops(
    width: int, height: int, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2
) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom), row-major, for an image too wide or too tall; [] for none.

    Crops split the long side into n equal parts of ceil(long / n) (the last may be short), with
    n near the aspect ratio, in [2, max_crops] and at most long // min_crop_size.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long, short = max(width, height), min(width, height)
    if long / short < min_ratio:
        return []
    n = math.floor(long / short + 0.5)  # round half up
    n = min(n, math.floor(long / min_crop_size))
    n = min(max(n, 2), max_crops)
    n_w, n_h = (n, 1) if width >= height else (1, n)
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    boxes = []
    for top, left in itertools.product(range(0, n_h * crop_h, crop_h), range(0, n_w * crop_w, crop_w)):
        # The reference slices arrays, so a box past the edge is clipped (never padded).
        right, bottom = min(left + crop_w, width), min(top + crop_h, height)
        if right > left and bottom > top:  # only degenerate settings (tiny min_crop_size) leave empties
            boxes.append((left, top, right, bottom))
    return boxes


def preprocess_image(
    image_or_path,
    config,
    pan_and_scan: bool = False,
    min_crop_size: int = 256,
    max_crops: int = 4,
    min_ratio: float = 1.2,
) -> tuple[mx.array, int]:
    """The image then its pan & scan crops, each stretched to S x S: ((1 + crops, S, S, 3) float32, crops),
    ready for `forward.logits(model, input_ids, pixels=pixels)`.

    `config` is a ModelConfig (S = config.vision.image_size) or the size S itself.
    """
    if isinstance(config, int):
        size = config
    elif getattr(config, "vision", None) is not None:
        size = config.vision.image_size
    else:
        raise ConfigError("this model has no vision tower, so it cannot take images")
    im = load_image(image_or_path)
    boxes = pan_and_scan_crops(*im.size, min_crop_size, max_crops, min_ratio) if pan_and_scan else []
    views = [im] + [im.crop(box) for box in boxes]
    # Resize the 8-bit pixels with PIL's bilinear filter (antialiased when shrinking), as the reference.
    pixels = np.stack([np.asarray(v.resize((size, size), Image.Resampling.BILINEAR)) for v in views])
    # Rescale to [0, 1], then normalize with mean 0.5, std 0.5: (N, S, S, 3) in [-1, 1]
    pixels = (pixels.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return mx.array(pixels), len(boxes)


def image_prompt_text(num_crops: int, image_token: str = IMAGE_TOKEN) -> str:
    """The text standing for one image: the token alone, or the reference's wording around its crops."""
    if not num_crops:
        return image_token
    crops = " ".join([image_token] * num_crops)
    return f"Here is the original image {image_token} and here are some crops to help you see better {crops}"
