"""LLaVA-OneVision's images as FlexVLM places them (``AnyresEncoder``), equal to transformers'
``LlavaOnevisionModel.get_image_features`` + ``pack_image_features`` (5.24) in ``hd``.

Every real view of an image (the base view, then the tiles row-major; ``preprocess.py``) goes
through the SigLIP tower (``hidden_states[vision_feature_layer]``, before ``post_layernorm``) and the
projector, token by token. Then, per mode (``FlexVLM``'s table):

- ``hd``, the plain model: the base view's g x g tokens, then the grid's h x w tokens (the tiles
  stitched, unpadded, shrunk bilinearly above the anyres_max budget), each grid row followed by
  ``image_newline``: g * g + h * (w + 1) tokens, as many placeholders in the prompt;
- ``lr_only``, ``xattn``, ``flex``: the base view's g x g tokens and one ``image_newline`` in the
  sequence (g * g + 1 placeholders); in ``xattn`` / ``flex`` the grid's h x w tokens, without the
  newlines, are the high-res tokens, row-major on a canvas of the batch's largest grid.

The grid is computed once (``grid_tokens``); ``hd`` adds the newlines to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.architectures.llava_onevision.images import OneVisionImages
from flexvlm.architectures.llava_onevision.preprocess import (
    OneVisionLayout, OneVisionProcessing, Size, base_cell_of_grid_tokens, image_layout,
)
from flexvlm.models.encoder import EncodedImages, VisualEncoder
from flexvlm.models.geometry import Shape, VisualLayout
from flexvlm.models.vision import VisionBackbone

__all__ = ["AnyresEncoder", "ImageNewline", "grid_tokens", "high_res_canvas"]

MODES = ("lr_only", "hd", "xattn", "flex")


class ImageNewline(nn.Module):
    """transformers' ``model.image_newline``: the learned (D,) embedding after each grid row (and after
    the base view of an image that is its own only view)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' initialisation, N(0, 1 / D) (also once a model built on the meta device has memory)."""
        nn.init.normal_(self.weight, std=1 / math.sqrt(self.weight.shape[0]))


def grid_tokens(tiles: Tensor, layout: OneVisionLayout) -> Tensor:
    """An image's projected tile tokens (rows * cols, g * g, D), tiles row-major -> its grid (D, h, w):
    stitched into one (rows g) x (cols g) grid, the rows (columns) over the canvas padding cut, shrunk
    bilinearly to the anyres_max budget; the operations of transformers' pack_image_features, in its
    order, so that the values are the same."""
    (rows, cols), g = layout.grid, layout.view_tokens
    grid = tiles.view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    (top, left), (kept_h, kept_w) = layout.unpad_offset, layout.unpadded_grid
    grid = grid[:, top: top + kept_h, left: left + kept_w]
    if layout.feature_grid != layout.unpadded_grid:
        grid = F.interpolate(grid[None], list(layout.feature_grid), mode="bilinear")[0]
    return grid


def high_res_canvas(grids: Sequence[Tensor], layouts: Sequence[OneVisionLayout]) -> tuple[Tensor, VisualLayout]:
    """Each sample's grid (D, h_b, w_b) -> the high-res tokens (B, H * W, D), row-major on a canvas of
    the largest grid (H, W) (zeros beyond a sample's grid), and their ``VisualLayout``: the base view
    (g x g, all of it the image) is the low-res grid; ``hr_cell`` is ``base_cell_of_grid_tokens``."""
    batch, g = len(grids), layouts[0].view_tokens
    sizes = [tuple(grid.shape[1:]) for grid in grids]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    first = grids[0]
    tokens = first.new_zeros(batch, height, width, first.shape[0])
    hr_cell = torch.full((batch, height, width), -1, dtype=torch.long, device=first.device)
    for b, (grid, layout) in enumerate(zip(grids, layouts)):
        h, w = sizes[b]
        tokens[b, :h, :w] = grid.permute(1, 2, 0)
        hr_cell[b, :h, :w] = base_cell_of_grid_tokens(layout).to(first.device)
    hr_sizes = torch.tensor(sizes, dtype=torch.long, device=first.device).view(batch, 2)
    lr_valid = torch.ones(batch, g, g, dtype=torch.bool, device=first.device)
    return tokens.flatten(1, 2), VisualLayout((g, g), hr_sizes, hr_cell, lr_valid, hr_cell >= 0)


def _batch_parts(images: Any) -> tuple[Tensor, Tensor, Sequence[OneVisionLayout] | None]:
    """(pixel_values, image_sizes, layouts or None) of a ``OneVisionBatch`` or a mapping with those keys."""
    get = images.get if isinstance(images, dict) else lambda key: getattr(images, key, None)
    pixel_values, image_sizes = get("pixel_values"), get("image_sizes")
    if not isinstance(pixel_values, Tensor) or not isinstance(image_sizes, Tensor):
        raise TypeError(f"LLaVA-OneVision's images are a batch with pixel_values (B, views, 3, S, S) and image_sizes "
                        f"(B, 2), as preprocess.batch_inputs makes it; got {type(images).__name__}")
    return pixel_values, image_sizes, get("layouts")


class AnyresEncoder(VisualEncoder):
    """LLaVA-OneVision's anyres image encoding (module docstring) around a SigLIP ``tower``
    (``flexvlm.models.siglip.siglip_tower``) whose native size is the view size S. ``text_width``:
    the decoder's width (``image_newline``'s size); ``pinpoints`` (height, width), multiples of S, and
    ``max_views`` (N of ``anyres_max_N``): the model's config.json, which the preprocessing must agree
    with (the batch's layouts are checked against the encoder's own)."""

    def __init__(self, tower: VisionBackbone, text_width: int, pinpoints: Sequence[Size], max_views: int) -> None:
        super().__init__()
        self.tower = tower
        self.newline = ImageNewline(text_width)
        self.feature_dim = tower.embed_dim
        # the views' settings, with the tower's normalisation and transformers' other defaults
        self.geometry = OneVisionProcessing(
            tile_size=tower.image_size, patch_size=tower.patch_size, max_views=max_views,
            pinpoints=tuple(tuple(int(side) for side in p) for p in pinpoints),
            image_mean=tuple(tower.mean), image_std=tuple(tower.std))
        self.view_tokens = self.geometry.view_tokens

    def image_processor(self, mode: str) -> OneVisionImages:
        return OneVisionImages(self.geometry, mode)

    @property
    def image_newline(self) -> nn.Parameter:
        return self.newline.weight

    @property
    def lr_shape(self) -> Shape:
        return (self.view_tokens, self.view_tokens)

    def layouts(self, image_sizes: Tensor) -> list[OneVisionLayout]:
        """Each image's layout from its (height, width), by the model's settings (as transformers packs
        by its config)."""
        return [image_layout((int(h), int(w)), self.geometry) for h, w in image_sizes.tolist()]

    def _tower(self, views: Tensor) -> Tensor:
        """(N, 3, S, S) views -> (N, g * g, C). transformers' stride-p convolution ignores the last
        S % p pixels of a side (384 px, patch 14: 6): cut, the same tokens (the tower refuses them)."""
        side = self.view_tokens * self.tower.patch_size
        return self.tower(views[..., :side, :side])

    def encode(self, images: Any, project: Callable[[Tensor], Tensor], mode: str,
               content_box: Tensor | None = None) -> EncodedImages:
        """``images``: a ``OneVisionBatch`` (or a dict with its ``pixel_values``, ``image_sizes``)."""
        if content_box is not None:
            raise ValueError("LLaVA-OneVision's views show the whole image (the base view) and its tiles: "
                             "no content_box")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {list(MODES)}")
        pixel_values, image_sizes, given = _batch_parts(images)
        layouts = self.layouts(image_sizes)
        self._check(pixel_values, image_sizes, layouts, given)
        newline = self.image_newline
        if mode == "lr_only":  # the base views alone: the tiles are never used
            lr_features = self._tower(pixel_values[:, 0])
            base = project(lr_features)
            return EncodedImages(self._with_newline(base), None, lr_features=lr_features)
        counts = [layout.num_views for layout in layouts]
        features = self._tower(torch.cat([pixel_values[b, :n] for b, n in enumerate(counts)]))
        views = project(features).split(counts)
        grids = [grid_tokens(v[1:], layout) for v, layout in zip(views, layouts)]
        if mode == "hd":
            packed = []
            for v, grid in zip(views, grids):
                d, h, _ = grid.shape
                rows = torch.cat((grid, newline[:, None, None].expand(d, h, 1).to(grid)), dim=-1)
                packed.append(torch.cat((v[0], rows.flatten(1, 2).transpose(0, 1))))
            lengths = torch.tensor([len(p) for p in packed], device=pixel_values.device)
            return EncodedImages(nn.utils.rnn.pad_sequence(packed, batch_first=True), lengths)
        starts = torch.tensor([0, *counts[:-1]], device=features.device).cumsum(0)
        high_res, layout = high_res_canvas(grids, layouts)
        return EncodedImages(self._with_newline(torch.stack([v[0] for v in views])), None, high_res=high_res,
                             layout=layout, lr_features=features[starts])

    def grid_features(self, images: Any) -> tuple[Tensor, Tensor]:
        """The tower's features before the projector: the base views' (B, g * g, C) and the grids'
        (stitched, unpadded, shrunk as the tokens are) on the high-res canvas (B, H * W, C)."""
        pixel_values, image_sizes, _ = _batch_parts(images)
        layouts = self.layouts(image_sizes)
        counts = [layout.num_views for layout in layouts]
        views = self._tower(torch.cat([pixel_values[b, :n] for b, n in enumerate(counts)])).split(counts)
        canvas, _ = high_res_canvas([grid_tokens(v[1:], layout) for v, layout in zip(views, layouts)], layouts)
        return torch.stack([v[0] for v in views]), canvas

    def _with_newline(self, base: Tensor) -> Tensor:
        """(B, g * g, D) base views -> (B, g * g + 1, D): each followed by image_newline. transformers 5.24's
        pack_image_features does this to an image that is its own only view (its `else` branch:
        ``torch.cat((image_feature, image_newline[None]))``), which is what the sequence of these modes is."""
        newline = self.image_newline.to(base)[None, None].expand(base.shape[0], 1, -1)
        return torch.cat((base, newline), dim=1)

    def _check(self, pixel_values: Tensor, image_sizes: Tensor, layouts: list[OneVisionLayout],
               given: Sequence[OneVisionLayout] | None) -> None:
        tile, batch = self.geometry.tile_size, pixel_values.shape[0]
        most = max(layout.num_views for layout in layouts)
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, tile, tile) or pixel_values.shape[1] < most:
            raise ValueError(f"expected pixel_values (B, >= {most} views, 3, {tile}, {tile}), got "
                             f"{tuple(pixel_values.shape)}")
        if tuple(image_sizes.shape) != (batch, 2):
            raise ValueError(f"expected image_sizes ({batch}, 2), got {tuple(image_sizes.shape)}")
        if given is not None and list(given) != layouts:
            raise ValueError("the batch was preprocessed with other settings than the model's (pinpoints, view size, "
                             "anyres_max budget): its layouts differ from those the model packs by")
