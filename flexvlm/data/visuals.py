"""How a model takes its images, for the data pipeline: what one sample's image becomes, how samples
batch, and the ids that stand for the image in the prompt. LLaVA-1.5's is ``SquareImages``; an
architecture whose preprocessing is its own gives its processor through its encoder
(``VisualEncoder.image_processor``), and the datamodule uses it once the model is known
(``fit_to_model``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.image import preprocess_image
from flexvlm.data.tokenizer import Tokenizer

__all__ = ["ImageProcessor", "SquareImages", "stack_square_images", "to_pil"]


class ImageProcessor(ABC):
    """One model's image pipeline (module docstring)."""

    # the sample entries ``process`` writes, which the collator batches through ``collate`` only
    sample_keys: tuple[str, ...] = ("image",)
    # words the prompt puts around the image tokens (``image_ids``), which a word-level tokenizer must know
    special_tokens: tuple[str, ...] = ()
    # an architecture that cuts images into square views: a view's side in pixels, and its side in
    # low-res tokens (what the built-in task's scenes are drawn to, ``SyntheticVQADataModule``)
    view_size: int | None = None
    view_tokens: int | None = None

    @abstractmethod
    def process(self, image: Image.Image) -> dict[str, Any]:
        """An RGB image -> the sample's entries (``sample_keys``)."""

    @abstractmethod
    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> the batch's image entries: ``images`` (what the model's encoder takes), and any
        other the model's forward takes (``content_box``)."""

    @abstractmethod
    def pictures(self, images: Any) -> list[tuple[Image.Image, tuple[int, int] | None]]:
        """A batch's ``images`` entry -> per sample, the picture its high-res tokens cover and the
        (rows, cols) of its high-res grid, the top-left corner of the batch's canvas (None: all of
        it), for the pictures of what was selected."""

    def image_ids(self, sample: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
        """The ids that replace the prompt's one image placeholder: the placeholder itself where the
        model expands it (LLaVA-1.5), else the architecture's tokens, one placeholder per image token."""
        return [IMAGE_TOKEN_INDEX]


class SquareImages(ImageProcessor):
    """LLaVA-1.5's: padded to a square with the mean colour, resized to ``size``, normalised
    (``flexvlm.data.image.preprocess_image``); the content box says where the image lies."""

    sample_keys = ("image", "content_box")

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def process(self, image: Image.Image) -> dict[str, Any]:
        tensor, content_box = preprocess_image(image, self.size, self.mean, self.std)
        return {"image": tensor, "content_box": content_box}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return stack_square_images(samples)

    def pictures(self, images: Tensor) -> list[tuple[Image.Image, tuple[int, int] | None]]:
        """The padded squares; their grids fill the canvas (every sample's is the same)."""
        return [(to_pil(image, self.mean, self.std), None) for image in images]


def to_pil(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo the normalisation of a (3, H, W) tensor."""
    pixels = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def stack_square_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples of square images (``SquareImages.process``, or a dataset that preprocesses them so)
    -> ``images`` (B, 3, S, S) and ``content_box`` (B, 4)."""
    return {"images": torch.stack([s["image"] for s in samples]),
            "content_box": torch.stack([s["content_box"] for s in samples])}
