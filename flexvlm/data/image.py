"""Image utilities shared by every dataset: loading, LLaVA's pad-to-square, normalisation."""

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

# The CLIP / LLaVA-1.5 vision-tower normalisation (openai CLIP ViT-L/14-336).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]

# Below these an image holds no scene to look at: a side under MIN_IMAGE_SIDE pixels, or a side more
# than MAX_ASPECT_RATIO times the other (padded to a square, its content is a thin strip of the view).
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 20

# Pillow's default limit (PIL.Image.MAX_IMAGE_PIXELS, about 89 M pixels): over it an image file may be
# a decompression bomb, a small file that decodes to gigabytes. The datamodules' max_image_pixels.
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def size_defect(width: int, height: int) -> str | None:
    """Why an image of this size is degenerate, or None."""
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"{width} x {height} pixels, under {MIN_IMAGE_SIDE} on a side"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"{width} x {height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}"
    return None


def has_alpha(img: Image.Image) -> bool:
    """Whether the image has transparency, which the RGB conversion drops (as LLaVA's does)."""
    return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and decode an image file in its own mode, turned upright as its EXIF orientation says (as
    transformers' ``load_image`` does). Every error is a ``ValueError`` that names the file: one that
    does not decode, more than ``max_pixels`` pixels (read from the header, before decoding),
    degenerate sizes (``size_defect``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow's own check: a warning over its limit, which max_pixels replaces; an error over twice it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                too_large = img.width * img.height > max_pixels
                if not too_large:
                    img.load()  # decodes the whole file, so truncation shows here
                    ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large {path}: {err} (Pillow refuses it whatever "
                         "data.init_args.max_image_pixels is)") from err
    # ValueError: e.g. a PNG text chunk over Pillow's limit; SyntaxError: unreadable EXIF data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    if too_large:
        raise ValueError(f"image too large {path}: {img.width} x {img.height} pixels, over the limit of {max_pixels} "
                         "(data.init_args.max_image_pixels)")
    defect = size_defect(*img.size)
    if defect:
        raise ValueError(f"degenerate image {path}: {defect}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. Pillow reads a 16-bit RGB file as 8-bit RGB, each value's high byte, but
    keeps 16-bit grey as mode I;16 (or I), whose ``convert("RGB")`` clips every value over 255 to white:
    here 16-bit grey keeps its high byte too (v >> 8), as 16-bit RGB does."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)  # mode I has 32 bits, a 16-bit file 0..65535
        img = Image.fromarray((values >> 8).astype(np.uint8))  # mode L
    return img.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``open_image`` as 8-bit RGB."""
    return to_rgb(open_image(path, max_pixels))


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, Box]:
    """LLaVA's expand2square: centre `img` on a square canvas of colour `fill`.

    Returns the square image and the content box (top, left, bottom, right) as fractions of the
    square side, which the model uses to ignore the padding border.
    """
    width, height = img.size
    if width == height:
        return img, (0.0, 0.0, 1.0, 1.0)
    side = max(width, height)
    top, left = (side - height) // 2, (side - width) // 2
    square = Image.new(img.mode, (side, side), fill)
    square.paste(img, (left, top))
    return square, (top / side, left / side, (top + height) / side, (left + width) / side)


def preprocess_image(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to square with the mean colour, resize (bicubic) to `size`, normalise.

    Returns the (3, size, size) float tensor and the content box as a (4,) tensor.
    """
    fill = tuple(int(m * 255) for m in mean)  # LLaVA's background: the vision model's mean colour
    square, box = pad_to_square(to_rgb(img), fill)
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    tensor = TF.normalize(TF.to_tensor(square), list(mean), list(std))
    return tensor, torch.tensor(box, dtype=torch.float32)
