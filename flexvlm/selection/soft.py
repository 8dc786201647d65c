"""Soft selection: the map's weights reach the high-res keys, beyond the paper's binary selection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flexvlm.selection.attention import AttentionSelection
from flexvlm.selection.base import SELECTION, SelectionContext


@SELECTION.register("soft")
class SoftSelection(AttentionSelection):
    """The keys ``AttentionSelection`` picks (its threshold or budget), each weighed by the row's attention
    on the low-res cell it falls in: a selected key's score gains ``sharpness * log(a_cell / a_max)``,
    a_max the row's largest attention on a valid cell, so its softmax weight is scaled by
    (a_cell / a_max) ** sharpness. At sharpness 1 a high-res key is weighed as the hierarchy
    p(key) ~ p(cell) p(key | cell) would; at 0 this is the binary selection."""

    def __init__(self, threshold: float | None = None, ratio: float | None = None, top_k: int | None = None,
                 block_grid: int | None = None, whole_blocks: bool = False, sharpness: float = 1.0) -> None:
        super().__init__(threshold, ratio, top_k, block_grid, whole_blocks)
        if sharpness < 0:
            raise ValueError(f"sharpness must be >= 0 (0: the binary selection), got {sharpness}")
        self.sharpness = sharpness

    def key_bias(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        b, r = attn_map.shape[:2]
        tiny = torch.finfo(attn_map.dtype).tiny  # a cell without attention: the most negative bias, finite
        cells = (attn_map * ctx.lr_valid.unsqueeze(1)).flatten(2).clamp(min=tiny).log()
        log_ratio = self.sharpness * (cells - cells.amax(-1, keepdim=True))
        # a padding token off the grid (selected only with whole_blocks) weighs as a cell without attention
        log_ratio = F.pad(log_ratio, (0, 1), value=self.sharpness * math.log(tiny))
        cell = ctx.layout.hr_cell.flatten(1)
        slot = cell.masked_fill(cell < 0, log_ratio.shape[-1] - 1)
        return log_ratio.gather(-1, slot[:, None].expand(b, r, -1)).view(b, r, *ctx.hr_shape)
