"""The selection interface: which high-res tokens each selecting query row attends to.

A strategy is called once per FlexAttention layer with the attention map that the previous layer's
query rows spread over the low-res image tokens, and returns a boolean mask over the high-res grid
for each of those rows. Strategies that do not look at the map (random, center) simply ignore it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flexvlm.models.geometry import Shape, VisualLayout, uniform_cells
from flexvlm.registry import Registry

SELECTION: Registry["SelectionStrategy"] = Registry("selection strategy", group="flexvlm.selection")


@dataclass
class SelectionContext:
    """What a strategy may read besides the map: the batch's geometry and the layer it selects for."""

    layout: VisualLayout  # the grids, which low-res cell covers which high-res token, the margins
    layer: int  # index of the decoder layer the selection is for
    # what depends on the images only, computed once per generation instead of at every layer and
    # step; shared by the contexts of one image batch (dataclasses.replace keeps the same dict)
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def lr_shape(self) -> Shape:
        """(h, w): the low-res grid the map covers."""
        return self.layout.lr_shape

    @property
    def hr_shape(self) -> Shape:
        """(H, W): the high-res canvas a selection mask covers."""
        return self.layout.hr_shape

    @property
    def lr_grid(self) -> int:
        """g, the side of a square low-res grid (LLaVA-1.5's g x g); use ``lr_shape`` for any grid."""
        return _side(self.lr_shape, "low-res", "lr_shape")

    @property
    def hr_grid(self) -> int:
        """G, the side of a square high-res grid (LLaVA-1.5's G x G); use ``hr_shape`` for any grid."""
        return _side(self.hr_shape, "high-res", "hr_shape")

    @property
    def lr_valid(self) -> Tensor:
        """(B, h, w) bool: low-res cells that show the image, not padding."""
        return self.layout.lr_valid

    @property
    def hr_valid(self) -> Tensor:
        """(B, H, W) bool: the same on the high-res canvas."""
        return self.layout.hr_valid

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per image batch and ``key`` (for results that depend on the images
        and the strategy's settings only, never on the attention map)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def block_index(self, blocks: Shape) -> Tensor:
        """(B, H, W) int64: the block of a (bh, bw) block grid each high-res token falls in, -1 off the
        sample's grid. The low-res grid's blocks are its cells (``layout.hr_cell``); other block
        grids are laid evenly over each sample's high-res grid."""
        if tuple(blocks) == self.lr_shape:
            return self.layout.hr_cell
        return self.memo(("block_index", blocks),
                         lambda: uniform_cells(self.layout.hr_sizes, self.hr_shape, blocks))

    def block_valid(self, blocks: Shape) -> Tensor:
        """(B, bh, bw) bool: blocks that hold at least one high-res token of the image."""
        return self.memo(("block_valid", blocks), lambda: self._block_valid(blocks))

    def _block_valid(self, blocks: Shape) -> Tensor:
        index = self.block_index(blocks).flatten(1)
        count = blocks[0] * blocks[1]
        # off-grid tokens (-1) go to one extra slot, dropped after
        slot = index.masked_fill(index < 0, count)
        valid = self.hr_valid.flatten(1)
        held = valid.new_zeros(valid.shape[0], count + 1).scatter_reduce(1, slot, valid, "amax")
        return held[:, :count].view(-1, *blocks)

    def expand_blocks(self, blocks: Tensor) -> Tensor:
        """(B, R, bh, bw) bool per block -> (B, R, H, W) bool per high-res token."""
        b, r, bh, bw = blocks.shape
        index = self.block_index((bh, bw)).flatten(1)
        flat = F.pad(blocks.flatten(2), (0, 1), value=False)  # slot bh * bw: off the grid, never selected
        slot = index.masked_fill(index < 0, bh * bw)
        return flat.gather(-1, slot[:, None].expand(b, r, -1)).view(b, r, *self.hr_shape)


def _side(shape: Shape, what: str, name: str) -> int:
    if shape[0] != shape[1]:
        raise ValueError(f"the {what} grid is {shape[0]} x {shape[1]}, not square: read ctx.{name}")
    return shape[0]


class SelectionStrategy(ABC):
    """Subclass, implement ``select``, and name the class in a config (``class_path``), or register
    it under a short name with ``@SELECTION.register("name")`` / the ``flexvlm.selection`` entry point.

    A strategy's ``repr`` is its class and the arguments it was built with (defaults included), for
    any subclass: it enters the key of a test run's answers (``answers.source``), so it must name the
    settings, never a memory address that differs between processes."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SelectionStrategy:
        strategy = super().__new__(cls)
        strategy._settings = {}
        if cls.__init__ is not object.__init__:  # a strategy without settings has none to name
            # bind_partial: unpickling calls __new__ without the arguments (and restores _settings after)
            bound = inspect.signature(cls.__init__).bind_partial(strategy, *args, **kwargs)
            bound.apply_defaults()
            strategy._settings = dict(list(bound.arguments.items())[1:])
        return strategy

    @property
    def settings(self) -> dict[str, Any]:
        """The arguments the strategy was built with, defaults included."""
        return dict(self._settings)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"{type(self).__name__}({settings})"

    @abstractmethod
    def select(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        """attn_map: (B, R, h, w) head-summed post-softmax attention of R query rows per sample over
        the low-res image tokens (detached). Returns (B, R, H, W) bool over the high-res canvas
        (``ctx.hr_shape``): the high-res tokens each row attends to."""

    def __call__(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        mask = self.select(attn_map, ctx)
        expected = (*attn_map.shape[:2], *ctx.hr_shape)
        if mask.shape != expected or mask.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__}.select returned {tuple(mask.shape)} {mask.dtype}, "
                             f"expected {expected} torch.bool")
        return self.clip(mask, ctx)

    def clip(self, mask: Tensor, ctx: SelectionContext) -> Tensor:
        """The selection cut to the image's high-res tokens: padding tokens carry no content."""
        return mask & ctx.hr_valid.unsqueeze(1)

    def key_bias(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor | None:
        """(B, R, H, W) float added to a row's scores of the high-res keys it selected (a soft selection,
        ``flexvlm.selection.soft``), or None: a selected key counts as it scores (the paper's binary
        selection)."""
        return None

    def max_selected(self, ctx: SelectionContext) -> int | None:
        """The most high-res tokens one row can select on this batch's geometry, where a fixed budget bounds
        it (a shape that depends on no map: the compiled decode step, ``flexvlm.models.static_decode``);
        None where the map decides the count (a threshold, an adaptive mass)."""
        return None

    @property
    def weighs_keys(self) -> bool:
        """Whether the strategy gives a ``key_bias``."""
        return type(self).key_bias is not SelectionStrategy.key_bias


class BlockSelection(SelectionStrategy):
    """Selection in square blocks of high-res tokens, as the release does: decide on a b x b block
    grid, then expand each block to its high-res tokens (nearest neighbour). ``block_grid=None``
    uses the low-res grid, so one block is the zoom x zoom high-res tokens under one low-res token.

    A selected block that overlaps the square-padding border is cut to the image by default (padding
    tokens carry no content); ``whole_blocks=True`` keeps it whole, padding tokens included, as the
    authors' release does (its released weights were trained that way)."""

    budget: Budget | None = None  # a subclass's fixed budget of blocks; None: the map decides how many

    def __init__(self, block_grid: int | None = None, whole_blocks: bool = False) -> None:
        if block_grid is not None and block_grid < 1:
            raise ValueError(f"block_grid must be >= 1, got {block_grid}")
        self.block_grid = block_grid
        self.whole_blocks = whole_blocks

    def clip(self, mask: Tensor, ctx: SelectionContext) -> Tensor:
        return mask if self.whole_blocks else super().clip(mask, ctx)

    def blocks(self, ctx: SelectionContext) -> Shape:
        """(bh, bw): the block grid, the low-res grid unless ``block_grid`` is set."""
        return (self.block_grid, self.block_grid) if self.block_grid else ctx.lr_shape

    def max_selected(self, ctx: SelectionContext) -> int | None:
        """With a ``budget``: the selectable high-res tokens of the budget's largest blocks, most over the
        samples."""
        if self.budget is None:
            return None
        blocks = self.blocks(ctx)
        count = blocks[0] * blocks[1]
        index = ctx.block_index(blocks).flatten(1)
        selectable = self.clip(torch.ones_like(ctx.hr_valid)[:, None], ctx).flatten(1)
        slot = index.masked_fill(index < 0, count)  # off the grid: one extra slot, dropped after (never selected)
        sizes = index.new_zeros(index.shape[0], count + 1).scatter_add_(1, slot, selectable.long())[:, :count]
        kept = int(self.budget.count(ctx.block_valid(blocks)).max())
        return int(sizes.topk(kept, dim=-1).values.sum(-1).max())

    @abstractmethod
    def select_blocks(self, attn_map: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        """(B, R, bh, bw) bool block mask."""

    def select(self, attn_map: Tensor, ctx: SelectionContext) -> Tensor:
        block_valid = ctx.block_valid(self.blocks(ctx))
        return ctx.expand_blocks(self.select_blocks(attn_map, block_valid, ctx) & block_valid.unsqueeze(1))


class Budget:
    """A fixed budget in blocks: ``top_k`` blocks, or ``ratio`` of the image's blocks (at least one)."""

    def __init__(self, ratio: float | None = None, top_k: int | None = None) -> None:
        if (ratio is None) == (top_k is None):
            raise ValueError(f"give exactly one of ratio and top_k (got ratio={ratio}, top_k={top_k})")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.ratio, self.top_k = ratio, top_k

    def count(self, block_valid: Tensor) -> Tensor:
        """(B,) number of blocks to keep per sample."""
        available = block_valid.flatten(1).sum(-1)
        if self.top_k is not None:
            return available.clamp(max=self.top_k)
        return (available.float() * self.ratio).round().long().clamp(min=1)

    def keep_best(self, scores: Tensor, block_valid: Tensor, ctx: SelectionContext) -> Tensor:
        """(B, R, b, b) scores -> bool mask of each row's best ``count`` valid blocks."""
        flat = scores.flatten(2).masked_fill(~block_valid.flatten(1).unsqueeze(1), float("-inf"))
        # which ranks each sample keeps depends on the image only: worked out once per image batch
        keep = ctx.memo(("budget", self.ratio, self.top_k, block_valid.shape[-2:]), lambda: self._ranks_kept(block_valid))
        best = flat.topk(keep.shape[-1], dim=-1).indices
        return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, best, keep.expand_as(best)).view_as(scores)

    def _ranks_kept(self, block_valid: Tensor) -> Tensor:
        """(B, 1, k) bool: rank j < count of the sample, k the largest count."""
        count = self.count(block_valid)
        return (torch.arange(int(count.max()), device=count.device) < count[:, None]).unsqueeze(1)


MARGIN_RULES = ("centre", "release")


def valid_grid(content_box: Tensor, grid: int, rule: str = "centre") -> Tensor:
    """(B, 4) content boxes (top, left, bottom, right as fractions of the padded square) -> (B, grid,
    grid) bool (LLaVA-1.5's square padding): the cells that are not padding border.

    ``centre``: a row / column of cells is border when its centre lies in the padding, so a cell
    that is mostly image stays selectable. ``release``: the authors' release, which marks
    floor(grid x top margin) rows (or columns) as border at both ends of the padded axis, the
    larger far margin of an odd padding included."""
    if rule not in MARGIN_RULES:
        raise ValueError(f"unknown margin rule {rule!r}; valid: {list(MARGIN_RULES)}")
    index = torch.arange(grid, device=content_box.device, dtype=content_box.dtype)
    top, left, bottom, right = (content_box[:, i, None] for i in range(4))
    if rule == "release":
        # the small epsilon keeps floor() exact where grid x margin is a whole number in float32
        rows_out, cols_out = (torch.floor(grid * margin + 1e-4) for margin in (top, left))
        rows = (index >= rows_out) & (index < grid - rows_out)
        cols = (index >= cols_out) & (index < grid - cols_out)
    else:
        centres = (index + 0.5) / grid
        rows = (centres >= top) & (centres < bottom)
        cols = (centres >= left) & (centres < right)
    return rows.unsqueeze(-1) & cols.unsqueeze(-2)
