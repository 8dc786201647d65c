"""The paper's ablation baselines (random, center) and the two limits (all, none)."""

from __future__ import annotations

import torch
from torch import Tensor

from flexvlm.selection.base import SELECTION, BlockSelection, Budget, SelectionContext, SelectionStrategy


@SELECTION.register("random")
class RandomSelection(BlockSelection):
    """``ratio`` / ``top_k`` blocks drawn uniformly among the image's blocks, independently per row.
    The draws come from the strategy's own generator, so a seed makes them repeatable. (The release's
    random ablation keeps each block of an 8 x 8 grid with probability 0.1 instead, padding blocks
    included: about the same budget on average, with a count that varies.)"""

    def __init__(self, ratio: float | None = 0.1, top_k: int | None = None, block_grid: int | None = None,
                 seed: int | None = None, whole_blocks: bool = False) -> None:
        super().__init__(block_grid, whole_blocks)
        self.budget = Budget(None if top_k is not None else ratio, top_k)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def select_blocks(self, attn_map: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        scores = torch.rand((*attn_map.shape[:2], *self.blocks(ctx)), generator=self.generator).to(attn_map.device)
        return self.budget.keep_best(scores, block_valid, ctx)


@SELECTION.register("center")
class CenterSelection(BlockSelection):
    """The ``ratio`` / ``top_k`` blocks closest to the centre of the image (padding excluded)."""

    def __init__(self, ratio: float | None = 0.1, top_k: int | None = None, block_grid: int | None = None,
                 whole_blocks: bool = False) -> None:
        super().__init__(block_grid, whole_blocks)
        self.budget = Budget(None if top_k is not None else ratio, top_k)

    def select_blocks(self, attn_map: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        # the choice depends on the image's geometry only: made once per image batch
        key = ("center", self.blocks(ctx), self.budget.ratio, self.budget.top_k)
        chosen = ctx.memo(key, lambda: self._central_blocks(block_valid, ctx))
        return chosen.unsqueeze(1).expand(-1, attn_map.shape[1], -1, -1)

    def _central_blocks(self, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        """(B, bh, bw) valid blocks -> (B, bh, bw) bool: the budget's blocks closest to their centre."""
        bh, bw = block_valid.shape[-2:]
        ys, xs = (torch.arange(n, device=block_valid.device, dtype=torch.float32) + 0.5 for n in (bh, bw))
        weights = block_valid.float()
        total = weights.sum(dim=(-1, -2)).clamp(min=1)
        cy = (weights.sum(-1) * ys).sum(-1) / total  # centre of the valid blocks, per sample
        cx = (weights.sum(-2) * xs).sum(-1) / total
        dist = (ys.view(1, bh, 1) - cy.view(-1, 1, 1)) ** 2 + (xs.view(1, 1, bw) - cx.view(-1, 1, 1)) ** 2
        # a tiny row-major tie-break keeps the choice deterministic among equidistant blocks
        tie = torch.arange(bh * bw, device=dist.device).view(bh, bw) * 1e-6
        return self.budget.keep_best(-(dist + tie).unsqueeze(1), block_valid, ctx)[:, 0]


@SELECTION.register("all")
class AllSelection(SelectionStrategy):
    """Every high-res token of the image (the upper limit)."""

    def select(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        return ctx.hr_valid.unsqueeze(1).expand(-1, attn_map.shape[1], -1, -1)


@SELECTION.register("none")
class NoSelection(SelectionStrategy):
    """No high-res token: FlexAttention layers reduce to plain self-attention."""

    def select(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        return torch.zeros(*attn_map.shape[:2], *ctx.hr_shape, dtype=torch.bool, device=attn_map.device)
