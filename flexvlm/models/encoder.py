"""Dual-path encoding: a low-resolution view in the sequence, a high-resolution token grid beside it."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.models.vision import VisionBackbone

__all__ = ["DualPathEncoder", "HIGH_RES_PATHS"]

HIGH_RES_PATHS = ("crops", "whole")


class DualPathEncoder(nn.Module):
    """Encodes a normalised, square-padded image (B, 3, S, S), S = zoom * backbone.image_size.

    Low-res: the image resized to the backbone's native size -> g x g tokens.
    High-res: (zoom * g) x (zoom * g) tokens, either from zoom x zoom native-size crops stitched
    back row-major ("crops", the paper) or from one pass over the whole image with resampled
    position embeddings ("whole"). The high-res path runs without gradient unless
    `high_res_grad` (the paper freezes it; small models trained from scratch need it).
    """

    def __init__(
        self,
        backbone: VisionBackbone,
        zoom: int = 3,
        high_res_path: str = "crops",
        high_res_grad: bool = False,
    ) -> None:
        super().__init__()
        if high_res_path not in HIGH_RES_PATHS:
            raise ValueError(f"unknown high_res_path {high_res_path!r}; valid: {', '.join(HIGH_RES_PATHS)}")
        if zoom < 1:
            raise ValueError(f"zoom must be >= 1, got {zoom}")
        if backbone.image_size % backbone.patch_size:
            # otherwise crops and the whole image would give different grids
            raise ValueError(
                f"backbone image size {backbone.image_size} is not a multiple of its patch size {backbone.patch_size}"
            )
        self.backbone = backbone
        self.zoom = zoom
        self.high_res_path = high_res_path
        self.high_res_grad = high_res_grad
        self.lr_grid = backbone.grid_size
        self.hr_grid = zoom * self.lr_grid
        self.high_res_size = zoom * backbone.image_size

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(low-res tokens (B, g*g, C), high-res tokens (B, (zoom*g)^2, C))."""
        return self.encode_low_res(images), self.encode_high_res(images)

    def encode_low_res(self, images: Tensor) -> Tensor:
        self._check_size(images)
        size = self.backbone.image_size
        # antialiased resizing has no bf16 / fp16 CPU kernel; in float32 it costs nothing next to the tower
        small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.backbone(small.to(images.dtype))

    def encode_high_res(self, images: Tensor) -> Tensor:
        self._check_size(images)
        with contextlib.nullcontext() if self.high_res_grad else torch.no_grad():
            if self.high_res_path == "whole":
                return self.backbone(images)
            return self._encode_crops(images)

    def _encode_crops(self, images: Tensor) -> Tensor:
        batch, channels = images.shape[:2]
        z, n, g = self.zoom, self.backbone.image_size, self.lr_grid
        # (B, 3, z*n, z*n) -> (B*z*z, 3, n, n), crops row-major
        crops = images.reshape(batch, channels, z, n, z, n).permute(0, 2, 4, 1, 3, 5)
        tokens = self.backbone(crops.reshape(batch * z * z, channels, n, n))
        # (B*z*z, g*g, C) -> (B, z*g * z*g, C): big-grid row = crop row * g + token row, same for columns
        tokens = tokens.reshape(batch, z, z, g, g, -1).permute(0, 1, 3, 2, 4, 5)
        return tokens.reshape(batch, (z * g) ** 2, -1)

    def _check_size(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[-2:] != (self.high_res_size, self.high_res_size):
            size = self.high_res_size
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
