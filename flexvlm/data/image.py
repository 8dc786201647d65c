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


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; the error always names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() decodes the whole file, so truncation shows here
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


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
