"""The visual geometry of a batch, one description that selection, the RoPE of high-res keys and the
FLOP model read instead of assuming one square image (docs/method.md, "Visual geometry").

An architecture's encoder describes each batch by a ``VisualLayout``:

- the low-res grid (h, w) whose cells the selecting map covers: the view that is in the sequence,
  its h * w tokens contiguous and row-major from the first image token on;
- each sample's high-res grid (H_b, W_b), any aspect ratio: the high-res tokens lie row-major on a
  canvas of the batch's largest grid (H, W), what lies beyond a sample's grid is padding;
- for each high-res token, the low-res cell that covers the same part of the image (``hr_cell``): a
  low-res cell's high-res tokens are where ``hr_cell`` equals it;
- which cells show the image and which show padding of the architecture's own (``lr_valid``,
  ``hr_valid``; LLaVA-1.5 pads to a square).

The high-res keys take the RoPE of the low-res image tokens, interpolated bicubically from the
low-res grid onto each sample's high-res grid (``high_res_rope``, the release's rule: both grids
span the same image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Shape = tuple[int, int]


@dataclass
class VisualLayout:
    """One batch's geometry (module docstring)."""

    lr_shape: Shape  # (h, w) of the low-res grid, the same for the batch
    hr_sizes: Tensor  # (B, 2) int64: each sample's high-res grid (rows, cols); the canvas is the largest
    hr_cell: Tensor  # (B, H, W) int64: flat low-res cell i * w + j covering each high-res token; -1 off the grid
    lr_valid: Tensor  # (B, h, w) bool: low-res cells that show the image
    hr_valid: Tensor  # (B, H, W) bool: high-res tokens that show the image (never off the sample's grid)

    @property
    def hr_shape(self) -> Shape:
        """(H, W): the canvas the high-res tokens of the batch lie on."""
        return tuple(self.hr_cell.shape[-2:])

    @property
    def batch(self) -> int:
        return self.hr_cell.shape[0]


def uniform_cells(hr_sizes: Tensor, canvas: Shape, grid: Shape) -> Tensor:
    """(B, H, W) int64: for each token of each sample's (H_b, W_b) grid on the canvas, the cell of a
    ``grid`` (gh, gw) laid evenly over that sample's grid, floor(i gh / H_b) * gw + floor(j gw / W_b)
    (nearest-neighbour resampling of the cell grid); -1 off the sample's grid."""
    (height, width), (gh, gw) = canvas, grid
    rows = torch.arange(height, device=hr_sizes.device)[None, :, None]
    cols = torch.arange(width, device=hr_sizes.device)[None, None, :]
    sample_h, sample_w = (hr_sizes[:, i, None, None] for i in range(2))
    cell = torch.div(rows * gh, sample_h.clamp(min=1), rounding_mode="floor") * gw + torch.div(
        cols * gw, sample_w.clamp(min=1), rounding_mode="floor")
    return cell.masked_fill((rows >= sample_h) | (cols >= sample_w), -1)


def on_canvas(grids: list[Tensor], canvas: Shape) -> Tensor:
    """Each sample's (h_b, w_b, D) grid at the top left of an (H, W) canvas of zeros -> (B, H * W, D)."""
    height, width = canvas
    return torch.stack([F.pad(g, (0, 0, 0, width - g.shape[1], 0, height - g.shape[0])) for g in grids]).flatten(1, 2)


def square_layout(lr_valid: Tensor, hr_valid: Tensor) -> VisualLayout:
    """The layout of one square image per sample on a g x g low-res and a G x G high-res grid (LLaVA-1.5,
    G = zoom * g), from the cells that show the image."""
    batch, g, hr = lr_valid.shape[0], lr_valid.shape[-1], hr_valid.shape[-1]
    sizes = torch.tensor([hr, hr], device=hr_valid.device).expand(batch, 2)
    return VisualLayout((g, g), sizes, uniform_cells(sizes, (hr, hr), (g, g)), lr_valid, hr_valid)


def interpolate_rope(cos: Tensor, sin: Tensor, lr_shape: Shape, hr_shape: Shape) -> tuple[Tensor, Tensor]:
    """RoPE for high-res keys, as the release does: cos / sin at the (h, w) low-res image positions,
    interpolated bicubically onto an (H, W) high-res grid. (B, h*w, d) -> (B, H*W, d)."""

    def resize(table: Tensor) -> Tensor:
        b, _, d = table.shape
        grid = table.float().transpose(1, 2).reshape(b, d, *lr_shape)
        grid = F.interpolate(grid, size=hr_shape, mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(table.dtype)

    return resize(cos), resize(sin)


def high_res_rope(cos: Tensor, sin: Tensor, layout: VisualLayout) -> tuple[Tensor, Tensor]:
    """cos / sin (B, h*w, d) of the low-res image tokens -> (B, H*W, d) of the high-res tokens on the
    canvas: each sample's grid interpolated on its own (``interpolate_rope``), zeros off it."""
    sizes = layout.hr_sizes
    # one grid for the batch (not an empty one: no sample has high-res tokens, nothing to interpolate onto)
    if 0 not in layout.hr_shape and bool((sizes == torch.tensor(layout.hr_shape, device=sizes.device)).all()):
        return interpolate_rope(cos, sin, layout.lr_shape, layout.hr_shape)
    (height, width), d = layout.hr_shape, cos.shape[-1]
    out_cos, out_sin = (t.new_zeros(layout.batch, height, width, d) for t in (cos, sin))
    for size in torch.unique(sizes, dim=0).tolist():
        samples = (sizes == sizes.new_tensor(size)).all(-1).nonzero().flatten()
        if 0 in size:  # a sample without high-res tokens
            continue
        part_cos, part_sin = interpolate_rope(cos[samples], sin[samples], layout.lr_shape, tuple(size))
        out_cos[samples, : size[0], : size[1]] = part_cos.view(-1, *size, d)
        out_sin[samples, : size[0], : size[1]] = part_sin.view(-1, *size, d)
    return out_cos.flatten(1, 2), out_sin.flatten(1, 2)
