"""An adaptive budget: each row keeps as many low-res cells as its own attention needs (the paper
names its fixed ~10 % budget for every question as one of its limits)."""

from __future__ import annotations

import torch
from torch import Tensor

from flexvlm.selection.base import SELECTION, BlockSelection, SelectionContext


@SELECTION.register("attention_mass")
class MassSelection(BlockSelection):
    """Per row and step, the fewest low-res cells that hold ``mass`` of the row's attention over the
    image (the cell that crosses it included; ties: the earlier cell), at least one and at most
    ``max_ratio`` of the image's cells (rounded, at least one): a row whose map is peaked selects
    little, a diffuse one more. Selection is per low-res cell, since the map is."""

    def __init__(self, mass: float = 0.5, max_ratio: float = 1.0, whole_blocks: bool = False) -> None:
        super().__init__(None, whole_blocks)
        if not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        if not 0 < max_ratio <= 1:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
        self.mass, self.max_ratio = mass, max_ratio

    def select_blocks(self, attn_map: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        valid = block_valid.flatten(1).unsqueeze(1)  # (B, 1, cells)
        scores = (attn_map * ctx.lr_valid.unsqueeze(1)).flatten(2).masked_fill(~valid, 0.0)
        share = scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)
        ordered, order = share.sort(dim=-1, descending=True, stable=True)
        before = ordered.cumsum(-1) - ordered  # the mass of the cells ranked above each one
        cap = (valid.sum(-1, keepdim=True).float() * self.max_ratio).round().clamp(min=1)
        rank = torch.arange(share.shape[-1], device=share.device)
        keep_sorted = ((before < self.mass) | (rank == 0)) & (rank < cap)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return keep.view_as(attn_map) & block_valid.unsqueeze(1)
