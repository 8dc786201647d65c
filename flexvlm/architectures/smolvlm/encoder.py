"""SmolVLM / Idefics3 images as FlexVLM places them (``TiledEncoder``): the tower runs on each real view (the
tiles row-major, then the global view), the connector's pixel shuffle turns each view into a t x t grid of
tokens, t = tile / patch / scale_factor, its linear map (FlexVLM's projector) takes them to the decoder's width,
and the mode decides where they go:

| mode                  | in the sequence                                      | beside it (high-res keys)            |
|-----------------------|------------------------------------------------------|--------------------------------------|
| `hd`                  | every view's tokens in the prompt's order: the model | -                                    |
|                       | as transformers runs it (its full prompt)            |                                      |
| `lr_only`             | the global view's t x t tokens                       | -                                    |
| `xattn`, `flex`       | the global view's t x t tokens                       | the tiles' tokens stitched into the  |
|                       |                                                      | image's (rows t) x (cols t) grid     |

Outside ``hd`` the prompt holds the global view's part alone (``preprocess.prompt_ids(..., global_only=True)``),
i.e. what transformers runs for an image that is its own only view. The prompt holds one placeholder per image
token: the processor's ``<image>`` id becomes FlexVLM's ``IMAGE_TOKEN_INDEX``
(``flexvlm.architectures.ids.flexvlm_input_ids``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode

from flexvlm.architectures.smolvlm.connector import pixel_shuffle
from flexvlm.architectures.smolvlm.images import SmolVLMImages
from flexvlm.architectures.smolvlm.preprocess import ImageBatch, ImageLayout, SmolVLMProcessing
from flexvlm.models.encoder import EncodedImages, VisualEncoder
from flexvlm.models.geometry import Shape, VisualLayout, on_canvas, uniform_cells
from flexvlm.models.vision import VisionBackbone

__all__ = ["TiledEncoder", "stitch_tiles"]

# the modes that place one image's global view in the sequence and its tiles beside it
_ONE_IMAGE_MODES = ("xattn", "flex")


def stitch_tiles(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """(rows * cols, n * n, D) tokens of the tiles (row-major, each its n x n grid row-major) -> the image's
    (rows n, cols n, D) grid: token (a, b) of tile (r, c) lands at (r n + a, c n + b)."""
    count, seq, dim = tiles.shape
    n = int(seq**0.5)
    if count != rows * cols or n * n != seq:
        raise ValueError(f"{count} tiles of {seq} tokens do not make a {rows} x {cols} grid of square tiles")
    return tiles.reshape(rows, cols, n, n, dim).permute(0, 2, 1, 3, 4).reshape(rows * n, cols * n, dim)


class TiledEncoder(VisualEncoder):
    """SmolVLM / Idefics3's views (module docstring) from ``preprocess``'s ``ImageBatch``.

    ``tower``: the vision tower (``flexvlm.models.siglip.siglip_tower``, ``last_hidden_state``), whose native
    size is the tile's; ``scale_factor``: the connector's pixel shuffle, which makes each view t x t tokens of
    the tower's width x scale_factor^2 (``feature_dim``, the projector's input)."""

    def __init__(self, tower: VisionBackbone, scale_factor: int = 2, longest_edge: int | None = None) -> None:
        """``longest_edge``: the preprocessing's ``size.longest_edge``, to which an image's longest edge is
        resized before it is cut into tiles (default: 4 tiles, transformers' proportion); the data pipeline's
        image processor (``image_processor``) uses it with transformers' other defaults."""
        super().__init__()
        if tower.grid_size % scale_factor:
            raise ValueError(f"the tower's {tower.image_size} px views of {tower.patch_size} px patches make a "
                             f"{tower.grid_size} x {tower.grid_size} grid, which a pixel shuffle by {scale_factor} "
                             f"cannot divide")
        self.tower = tower
        self.scale_factor = scale_factor
        self.tile_size = tower.image_size
        self.grid = tower.grid_size // scale_factor  # t: a view's tokens per side after the connector
        self.feature_dim = tower.embed_dim * scale_factor**2
        self.processing = SmolVLMProcessing(
            family="smolvlm", tile_size=self.tile_size, longest_edge=longest_edge or 4 * self.tile_size,
            do_image_splitting=True, resample=InterpolationMode.LANCZOS, image_mean=tuple(tower.mean),
            image_std=tuple(tower.std), rescale_factor=1 / 255, image_seq_len=self.grid**2)

    def image_processor(self, mode: str) -> SmolVLMImages:
        return SmolVLMImages(self.processing, mode)

    @property
    def lr_shape(self) -> Shape:
        return (self.grid, self.grid)

    def encode(self, images: ImageBatch, project: Callable[[Tensor], Tensor], mode: str,
               content_box: Tensor | None = None) -> EncodedImages:
        """The tokens of ``images`` for ``mode`` (module docstring); ``project``: the connector."""
        if content_box is not None:
            raise ValueError("SmolVLM / Idefics3 views show the whole image, with no padding of their own: "
                             "content_box must be None")
        views = self._views(images, mode)
        features = self._features(images, views)
        tokens = project(features)  # (N, t * t, D), each view row-major
        if tokens.shape[1] != self.grid**2:
            raise ValueError(f"the projector made {tokens.shape[1]} tokens of a view; the encoder's grid is "
                             f"{self.grid} x {self.grid} (tile {self.tile_size}, scale_factor {self.scale_factor})")
        per_sample = list(tokens.split([len(sample) for sample in views]))
        if mode in ("hd", "lr_only"):  # lr_only: each image's global view, which _views kept alone
            counts = [len(sample) * self.grid**2 for sample in views]
            in_sequence = torch.nn.utils.rnn.pad_sequence([t.flatten(0, 1) for t in per_sample], batch_first=True)
            # counts: None when every sample has as many image tokens
            count_tensor = None if len(set(counts)) == 1 else torch.tensor(counts, device=tokens.device)
            return EncodedImages(in_sequence, count_tensor)
        # the features before the projector are left out (an objective asks grid_features): the tiles' would be
        # a copy of the largest tensor of the pass
        out = EncodedImages(torch.stack([t[-1] for t in per_sample]), None)
        out.high_res, out.layout = self._high_res(per_sample, [sample[0] for sample in images.layouts], tokens)
        return out

    def grid_features(self, images: ImageBatch) -> tuple[Tensor, Tensor]:
        """The pixel-shuffled tower features of each sample's one image, before the projector: its global
        view's (B, t * t, C s^2) and its tiles' on the high-res canvas (B, H * W, C s^2), where ``flex`` puts
        the tokens made of them."""
        views = self._views(images, "flex")
        per_sample = list(self._features(images, views).split([len(sample) for sample in views]))
        canvas, _ = self._high_res(per_sample, [sample[0] for sample in images.layouts], per_sample[0])
        return torch.stack([f[-1] for f in per_sample]), canvas

    def _features(self, images: ImageBatch, views: list[list[int]]) -> Tensor:
        """(N, t * t, C s^2): the chosen views' tower features, pixel-shuffled, in order."""
        pixels = images.pixel_values
        # the real views only, as the layouts name them (pixel_attention_mask agrees, checked in _views): the views
        # transformers keeps, which drops the all-zero padding views before its tower
        chosen = [(i, v) for i, sample in enumerate(views) for v in sample]
        bi, vi = (torch.tensor(index, dtype=torch.long, device=pixels.device) for index in zip(*chosen))
        # transformers' stride-p convolution ignores the last T % p pixels of a side (SigLIP so400m's 384 px
        # with 14 px patches: 6): cut, the same tokens (the tower refuses a side that is no multiple of p)
        side = self.tower.grid_size * self.tower.patch_size
        return pixel_shuffle(self.tower(pixels[bi, vi][..., :side, :side]), self.scale_factor)

    def _high_res(self, per_sample: list[Tensor], layouts: list[ImageLayout],
                  like: Tensor) -> tuple[Tensor, VisualLayout]:
        """Each sample's tiles (its views but the last, the global one) stitched into its (rows t, cols t) grid,
        on a canvas of the batch's largest rows and largest columns, and the layout on the t x t low-res grid."""
        n = self.grid
        sizes = torch.tensor([[layout.rows * n, layout.cols * n] for layout in layouts], dtype=torch.long,
                             device=like.device)
        canvas = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
        grids = [stitch_tiles(views[:-1], layout.rows, layout.cols) if layout.rows
                 else like.new_zeros(0, 0, like.shape[-1]) for views, layout in zip(per_sample, layouts)]
        # The global view is the whole resized image squeezed to one tile, and the tiles cover that same image
        # evenly (rows x cols tiles of tile x tile pixels, no padding): low-res cell (i, j) shows rows [i / n,
        # (i + 1) / n) of the image, high-res token (r, c) rows [r / (rows n), (r + 1) / (rows n)), which lie in
        # cell floor(r / rows) exactly, the even mapping of uniform_cells (likewise for columns).
        cells = uniform_cells(sizes, canvas, (n, n))
        batch = len(layouts)
        layout = VisualLayout((n, n), sizes, cells, torch.ones(batch, n, n, dtype=torch.bool, device=like.device),
                              cells >= 0)
        return on_canvas(grids, canvas), layout

    def _views(self, images: ImageBatch, mode: str) -> list[list[int]]:
        """Per sample, the indices of the views the mode encodes: every real view (``hd``, and ``xattn`` /
        ``flex``, whose one image's global view comes last), or each image's global view (``lr_only``)."""
        if not isinstance(images, ImageBatch):
            raise TypeError(f"TiledEncoder encodes the SmolVLM preprocessing's ImageBatch "
                            f"(flexvlm.architectures.smolvlm.preprocess.batch_images), got {type(images).__name__}")
        pixels, tile = images.pixel_values, self.tile_size
        if pixels.ndim != 5 or pixels.shape[2:] != (3, tile, tile) or len(images.layouts) != pixels.shape[0]:
            raise ValueError(f"expected pixel_values (B, views, 3, {tile}, {tile}) and one list of layouts per "
                             f"sample, got {tuple(pixels.shape)} and {len(images.layouts)} lists")
        views: list[list[int]] = []
        for i, layouts in enumerate(images.layouts):
            if mode in _ONE_IMAGE_MODES and len(layouts) != 1:
                raise ValueError(f"mode {mode!r} places one image's global view in the sequence and its tiles beside "
                                 f"it, but sample {i} holds {len(layouts)} images; give one image per sample, or use "
                                 f"mode hd or lr_only")
            sample, start = [], 0
            for layout in layouts:
                if layout.tile_size != tile:
                    raise ValueError(f"sample {i}: views of {layout.tile_size} px, the tower's are {tile} px")
                sample += ([start + layout.global_view] if mode == "lr_only"
                           else list(range(start, start + layout.num_views)))
                start += layout.num_views
            if start > pixels.shape[1]:
                raise ValueError(f"sample {i}: its layouts name {start} views, pixel_values holds {pixels.shape[1]}")
            views.append(sample)
        real = images.pixel_attention_mask.flatten(2).any(-1).sum(-1).tolist()
        named = [sum(layout.num_views for layout in layouts) for layouts in images.layouts]
        if real != named:
            raise ValueError(f"real views per sample: {real} by pixel_attention_mask, {named} by the layouts")
        if not any(views):
            raise ValueError("the batch holds no image")
        return views
