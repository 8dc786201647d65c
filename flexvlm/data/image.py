"""Image utilities shared by every dataset: loading, LLaVA's pad-to-square, normalisation."""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

# The CLIP / LLaVA-1.5 vision-tower normalisation (openai CLIP ViT-L/14-336).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]

# Below these an image holds no scene to look at: a side under MIN_IMAGE_SIDE pixels, or a side more
# than MAX_ASPECT_RATIO times the other (padded to a square, its content is a thin strip of the view).
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 20


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


def open_image(path: str | Path) -> Image.Image:
    """Open and decode an image file in its own mode; the error always names the file, and
    degenerate sizes (``size_defect``) are errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file, so truncation shows here
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    defect = size_defect(*img.size)
    if defect:
        raise ValueError(f"degenerate image {path}: {defect}")
    return img


def load_image(path: str | Path) -> Image.Image:
    """``open_image`` as RGB."""
    return open_image(path).convert("RGB")


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
    square, box = pad_to_square(img.convert("RGB"), fill)
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    tensor = TF.normalize(TF.to_tensor(square), list(mean), list(std))
    return tensor, torch.tensor(box, dtype=torch.float32)
