"""Qwen2-VL / Qwen2.5-VL's multimodal RoPE (M-RoPE) in the decoder, as transformers computes it (its model's
``get_rope_index`` for images, and its text rotary embedding), without it.

Every token has three positions, (temporal, height, width). A text token's three are equal and count on from the
previous token. An image of (t, h, w) patches gives H x W = (h / m) x (w / m) tokens, row-major (frames outer),
starting at the current position s: token (f, i, j) is at (s + f, s + i, s + j); the text after the image goes on
from s + max(H, W) (for a still image, t = 1). Padding is skipped (the positions count the attended tokens
only, whichever side they are on) and holds position 0. The rope delta of a sample, the largest position + 1 minus
its number of tokens, is what a later token's position (its index in the sample) is shifted by while generating.

The rotary frequencies are the decoder's ordinary ones (head_dim / 2 of them); ``mrope_section`` (t, h, w)
splits them into three runs, the first turning with the temporal position, the next with the height, the last
with the width (``mrope_cos_sin``, the Qwen2 family's, which its decoder uses when its config has an
``mrope_section``). Only the cos / sin tables change: the rotation of q and k is the usual rotate-half one
(``flexvlm.models.decoder.apply_rope``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexvlm.architectures.qwen2_vl.preprocess import Grid, num_image_tokens
from flexvlm.models.geometry import VisualLayout
from flexvlm.models.qwen2 import mrope_cos_sin  # the decoder's tables, defined with the Qwen2 family

__all__ = ["high_res_positions", "image_positions", "mrope_cos_sin", "rope_index"]


def image_positions(grid: Grid, merge_size: int, start: int) -> Tensor:
    """(3, t * H * W) int64: the (temporal, height, width) positions of an image's tokens from ``start``."""
    t, h, w = grid
    num_image_tokens(grid, merge_size)  # refuses a grid that does not merge
    frames, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h // merge_size), torch.arange(w // merge_size),
                                        indexing="ij")
    return torch.stack([frames, rows, cols]).flatten(1) + start


def rope_index(image_mask: Tensor, image_grid_thw: Tensor | Sequence[Grid], merge_size: int,
               attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(position_ids (3, B, L) int64, rope deltas (B, 1) int64) of a batch (module docstring).

    ``image_mask`` (B, L) bool: the image (pad) tokens, ``input_ids == image_token_id``; ``image_grid_thw``: the
    batch's grids in order, sample after sample (as the processor returns them), one per image, each image a
    run of t * h * w / m^2 image tokens (two images may touch: each takes its own count of tokens);
    ``attention_mask`` (B, L): 0 at padding, on either side."""
    if image_mask.ndim != 2 or (attention_mask is not None and attention_mask.shape != image_mask.shape):
        raise ValueError(f"image_mask {tuple(image_mask.shape)}: expected (B, L), and an attention_mask of that shape")
    grids = [tuple(int(v) for v in g) for g in (image_grid_thw.tolist() if isinstance(image_grid_thw, Tensor)
                                               else image_grid_thw)]
    valid = torch.ones_like(image_mask, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position_ids = torch.zeros(3, *image_mask.shape, dtype=torch.long)
    deltas, next_grid = [], 0
    for b in range(image_mask.shape[0]):
        is_image = image_mask[b][valid[b]].tolist()
        if not is_image:
            raise ValueError(f"sample {b} has no attended token")
        pieces, index, position = [], 0, 0
        while index < len(is_image):
            if not is_image[index]:  # a run of text
                end = is_image.index(True, index) if True in is_image[index:] else len(is_image)
                pieces.append(torch.arange(position, position + end - index).expand(3, -1))
                position, index = position + end - index, end
                continue
            if next_grid == len(grids):
                raise ValueError(f"sample {b} holds more images than the {len(grids)} grids of image_grid_thw")
            grid = grids[next_grid]
            count = num_image_tokens(grid, merge_size)
            if not all(is_image[index:index + count]):
                raise ValueError(f"sample {b}: image {next_grid} of grid {grid} needs {count} image tokens in a row, "
                                 f"found {sum(is_image[index:index + count])} at token {index}")
            pieces.append(image_positions(grid, merge_size, position))
            position, index, next_grid = position + max(grid[1], grid[2]) // merge_size, index + count, next_grid + 1
        positions = torch.cat(pieces, dim=1)
        position_ids[:, b, valid[b].cpu()] = positions
        deltas.append(int(positions.max()) + 1 - len(is_image))
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw holds {len(grids)} grids, the batch {next_grid} images")
    device = image_mask.device
    return position_ids.to(device), torch.tensor(deltas, dtype=torch.long, device=device)[:, None]


def high_res_positions(lr_positions: Tensor, layout: VisualLayout) -> Tensor:
    """(3, B, H * W) float32: the multimodal positions of the high-res keys on the layout's canvas, from
    ``lr_positions`` (3, B, h * w), those of the low-res image's tokens in the sequence (row-major on the layout's
    (h, w) grid). High-res token (i, j) of a sample's (H_b, W_b) grid falls in the low-res cell (a, c) =
    (floor(i h / H_b), floor(j w / W_b)) (``layout.hr_cell``, the even mapping); it takes that cell's (t, h, w)
    positions with the row and column scaled to the high-res grid: (t, r + i h / H_b - a, q + j w / W_b - c) for
    the cell's (t, r, q), i.e. the image's first row and column positions plus i h / H_b and j w / W_b. The
    integer part of a key's row and column is its cell's, and a grid as large as the low-res one gets the low-res
    positions themselves. 0 off a sample's grid."""
    (height, width), (h, w) = layout.hr_shape, layout.lr_shape
    cells = layout.hr_cell.flatten(1)  # (B, H * W)
    device = lr_positions.device
    cell_positions = lr_positions.float().gather(2, cells.clamp(min=0)[None].expand(3, -1, -1).to(device))
    sizes = layout.hr_sizes.to(device).float()
    rows = torch.arange(height, device=device)[None, :, None] * h / sizes[:, 0, None, None].clamp(min=1)
    cols = torch.arange(width, device=device)[None, None, :] * w / sizes[:, 1, None, None].clamp(min=1)
    fraction = torch.stack([torch.zeros_like(rows * cols), (rows - rows.floor()).expand(-1, -1, width),
                            (cols - cols.floor()).expand(-1, height, -1)]).flatten(2)  # (3, B, H * W)
    return (cell_positions + fraction).masked_fill((cells < 0)[None].to(device), 0.0)
