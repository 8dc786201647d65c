"""LLaVA-OneVision images for flexvlm's data pipeline (``flexvlm.data.visuals``): each image as its views and
layout (``preprocess.preprocess_image``), samples batched as the encoder takes them (``pixel_values`` padded
with zero views, ``image_sizes``, ``layouts``), the prompt's image placeholder turned into one placeholder per
image token of the mode (``OneVisionLayout.tokens_in_sequence``), pictures of the tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from flexvlm.architectures.llava_onevision.preprocess import OneVisionLayout, OneVisionProcessing, preprocess_image
from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import Tokenizer
from flexvlm.data.visuals import ImageProcessor, to_pil

__all__ = ["OneVisionImage", "OneVisionImages", "ViewBatch"]


@dataclass(frozen=True)
class OneVisionImage:
    views: Tensor  # (1 + rows * cols, 3, S, S): the base view, then the tiles row-major
    layout: OneVisionLayout


@dataclass(frozen=True)
class ViewBatch:
    """Samples' views as ``AnyresEncoder`` takes them."""

    pixel_values: Tensor  # (B, most views, 3, S, S), zeros after a sample's own views
    image_sizes: Tensor  # (B, 2) int64, (height, width)
    layouts: list[OneVisionLayout]

    def to(self, *args, **kwargs) -> "ViewBatch":
        """The tensors moved as ``Tensor.to`` moves them (how Lightning moves a batch to its device)."""
        return replace(self, pixel_values=self.pixel_values.to(*args, **kwargs),
                       image_sizes=self.image_sizes.to(*args, **kwargs))


class OneVisionImages(ImageProcessor):
    """``settings``: the views' settings (the model's); ``mode``: the FlexVLM mode whose prompt the samples get."""

    def __init__(self, settings: OneVisionProcessing, mode: str) -> None:
        self.settings, self.mode = settings, mode
        self.view_size, self.view_tokens = settings.tile_size, settings.view_tokens

    def process(self, image: Image.Image) -> dict[str, Any]:
        return {"image": OneVisionImage(*preprocess_image(image, self.settings))}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        most = max(image.views.shape[0] for image in images)
        pixel_values = images[0].views.new_zeros(len(images), most, *images[0].views.shape[1:])
        for b, image in enumerate(images):
            pixel_values[b, : image.views.shape[0]] = image.views
        sizes = torch.tensor([image.layout.image_size for image in images], dtype=torch.long)
        return {"images": ViewBatch(pixel_values, sizes, [image.layout for image in images])}

    def image_ids(self, sample: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
        return [IMAGE_TOKEN_INDEX] * sample["image"].layout.tokens_in_sequence(self.mode)

    def pictures(self, images: ViewBatch) -> list[tuple[Image.Image, tuple[int, int] | None]]:
        """Each sample's tiles put together again and cut to the part its high-res grid keeps (the rows and
        columns of tokens over the canvas padding removed), and that grid's size."""
        s, out = self.settings, []
        for pixels, layout in zip(images.pixel_values, images.layouts):
            (rows, cols), g, patch = layout.grid, layout.view_tokens, layout.patch_size
            tiles = pixels[1: 1 + rows * cols].unflatten(0, (rows, cols))
            canvas = tiles.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)  # (3, rows S, cols S)

            def pixel(token: int) -> int:  # where a grid token's pixels start on the canvas
                return token // g * s.tile_size + token % g * patch

            (top, left), (kept_h, kept_w) = layout.unpad_offset, layout.unpadded_grid
            kept = canvas[:, pixel(top): pixel(top + kept_h - 1) + patch, pixel(left): pixel(left + kept_w - 1) + patch]
            out.append((to_pil(kept, s.image_mean, s.image_std), layout.feature_grid))
        return out
