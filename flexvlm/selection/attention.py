"""Selection from the query row's own attention over the low-res image (the paper's method)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from flexvlm.selection.base import SELECTION, BlockSelection, Budget, SelectionContext


@SELECTION.register("attention")
class AttentionSelection(BlockSelection):
    """The release's rule by default: zero the padding border, min-max normalise each row's map,
    max-pool to the block grid, keep blocks with ``map * 255 > threshold`` (48 in the released
    checkpoint, the default). With ``ratio`` or ``top_k`` instead, keep a fixed budget of the highest
    blocks; a threshold given with a budget is refused, since only one of them can decide."""

    DEFAULT_THRESHOLD = 48.0

    def __init__(self, threshold: float | None = None, ratio: float | None = None, top_k: int | None = None,
                 block_grid: int | None = None, whole_blocks: bool = False) -> None:
        super().__init__(block_grid, whole_blocks)
        self.budget = Budget(ratio, top_k) if ratio is not None or top_k is not None else None
        if self.budget is not None and threshold is not None:
            raise ValueError(f"AttentionSelection takes a threshold or a budget, not both (got threshold={threshold}, "
                             f"ratio={ratio}, top_k={top_k}): set threshold to null to keep the budget")
        if self.budget is None and threshold is None:
            threshold = self.DEFAULT_THRESHOLD
        self.threshold = threshold

    def select_blocks(self, attn_map: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        scores = attn_map * ctx.lr_valid.unsqueeze(1)
        b, r, h, w = scores.shape
        blocks = block_valid.shape[-2:]
        if self.budget is not None:  # a ranking: the per-row min-max normalisation would not change it
            pooled = F.adaptive_max_pool2d(scores.view(b * r, h, w), blocks)
            return self.budget.keep_best(pooled.view(b, r, *blocks), block_valid, ctx)
        low = scores.amin(dim=(-1, -2), keepdim=True)
        high = scores.amax(dim=(-1, -2), keepdim=True)
        scores = (scores - low) / (high - low).clamp(min=1e-12)
        pooled = F.adaptive_max_pool2d(scores.view(b * r, h, w), blocks).view(b, r, *blocks)
        return pooled * 255 > self.threshold
