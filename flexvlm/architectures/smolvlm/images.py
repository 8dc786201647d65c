"""SmolVLM / Idefics3 images for flexvlm's data pipeline (``flexvlm.data.visuals``): each image split into
its views (``preprocess.split_image``), samples batched into an ``ImageBatch``, the prompt's image placeholder
turned into the architecture's image prompt (its special tokens and one placeholder per image token: the whole
prompt in ``hd``, the global view's part in the other modes), pictures of the tiles for the selection pictures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from flexvlm.architectures.smolvlm.preprocess import ImageBatch, SmolVLMProcessing, collate, image_prompt, split_image
from flexvlm.data.tokenizer import Tokenizer
from flexvlm.data.visuals import ImageProcessor, to_pil

__all__ = ["SmolVLMImages"]


class SmolVLMImages(ImageProcessor):
    """``processing``: the views' settings; ``mode``: the FlexVLM mode whose prompt the samples get."""

    def __init__(self, processing: SmolVLMProcessing, mode: str) -> None:
        self.processing, self.mode = processing, mode
        p = processing
        most = math.ceil(p.longest_edge / p.tile_size)  # tiles per side at the most
        self.special_tokens = (p.fake_image_token, p.global_image_token,
                               *(f"<row_{r}_col_{c}>" for r in range(1, most + 1) for c in range(1, most + 1)))
        self.view_size, self.view_tokens = p.tile_size, math.isqrt(p.image_seq_len)

    def process(self, image: Image.Image) -> dict[str, Any]:
        return {"image": split_image(image, self.processing)}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"images": collate([[s["image"]] for s in samples])}

    def image_ids(self, sample: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
        layout = sample["image"].layout
        return tokenizer.encode(image_prompt(layout, self.processing, global_only=self.mode != "hd"))

    def pictures(self, images: ImageBatch) -> list[tuple[Image.Image, tuple[int, int] | None]]:
        """Each sample's tiles put together again (the resized image the high-res tokens cover), or its global
        view for an image that is not split; its high-res grid is rows x cols tiles of t x t tokens."""
        p, t = self.processing, self.view_tokens
        out = []
        for pixels, (layout, *_) in zip(images.pixel_values, images.layouts):
            if not layout.rows:
                out.append((to_pil(pixels[layout.global_view], p.image_mean, p.image_std), (0, 0)))
                continue
            tiles = pixels[: layout.rows * layout.cols].unflatten(0, (layout.rows, layout.cols))
            whole = tiles.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)  # (3, rows T, cols T)
            out.append((to_pil(whole, p.image_mean, p.image_std), (layout.rows * t, layout.cols * t)))
        return out
