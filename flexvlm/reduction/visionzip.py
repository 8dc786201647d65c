"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): before the decoder, each tower pass keeps its
"dominant" tokens, those its class token attends to most in the layer whose output the model uses, and
merges the rest into a few "contextual" tokens by that layer's keys. The rule of its code
(dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` and ``utils.py``; LLaVA-NeXT's order from
``llava_arch.py``), per pass of n patch tokens:

- dominant: the class token, and the patches of the highest attention from it (summed over heads in the
  code, here the mean: the same order); a tower without a class token (SigLIP) rates by the attention
  each patch gets, averaged over every query. Ties go to the earlier patch.
- contextual: the other patches, in grid order, are compared by their keys averaged over heads and
  L2-normalised; ``contextual`` targets lie uniformly among them (every (left // contextual)-th, from the
  first), every other one joins the target of the highest cosine similarity (the first of equals), and a
  contextual token is its target's hidden state plus the mean of those that joined it (the code adds the
  target to the mean; the paper's text calls the merge an average).
- order: the class token, the dominant patches in grid order, the contextual tokens (LLaVA-1.5). With
  several crops of an image (LLaVA-NeXT's sub-images), each its own pass and class token: every crop's
  dominant patches in the order of the stitched grid, then the crops' class tokens, then their contextual
  tokens, crop after crop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexvlm.reduction.base import REDUCTION, ImageTokenReduction, kept_count

if TYPE_CHECKING:
    from flexvlm.models.vision import TokenAttention

# the paper's split of a budget: 54 dominant (the class token included) and 10 contextual tokens of 64
# (LLaVA-1.5: 108 + 20 of 128, 162 + 30 of 192; LLaVA-NeXT the same per sub-image)
PAPER_DOMINANT, PAPER_CONTEXTUAL = 54, 10
PAPER_KEEP = (PAPER_DOMINANT + PAPER_CONTEXTUAL) / 576  # its main setting: 64 of LLaVA-1.5's 576 tokens


@REDUCTION.register("visionzip")
class VisionZip(ImageTokenReduction):
    def __init__(self, keep: float | None = None, dominant: int | None = None, contextual: int | None = None) -> None:
        """``keep``: the share of a tower pass's patch tokens that reach the sequence, dominant and
        contextual together (the budget a protocol gives every method), split as the paper's 54 : 10
        (default 64 / 576, its main LLaVA-1.5 setting); or instead ``dominant`` and ``contextual``, the
        counts per tower pass (the paper's 54 and 10 of LLaVA-1.5's 576 tokens, per sub-image for
        LLaVA-NeXT), ``dominant`` counting the class token where the tower has one, as its code does."""
        counts = (dominant, contextual)
        if keep is not None and counts != (None, None):
            raise ValueError(f"VisionZip takes keep, or dominant and contextual, not both (got keep={keep}, "
                             f"dominant={dominant}, contextual={contextual})")
        if (dominant is None) != (contextual is None):
            raise ValueError(f"VisionZip takes dominant and contextual together (got dominant={dominant}, "
                             f"contextual={contextual})")
        if keep is not None and not 0.0 < keep <= 1.0:
            raise ValueError(f"VisionZip's keep is a share of the image tokens, in (0, 1], got {keep}")
        if dominant is not None and (dominant < 0 or contextual < 0 or dominant + contextual < 1):
            raise ValueError(f"VisionZip's dominant and contextual are counts of tokens, at least one in all, got "
                             f"{dominant} and {contextual}")
        self.keep = PAPER_KEEP if keep is None and dominant is None else keep
        self.dominant, self.contextual = dominant, contextual

    def split(self, num_patches: int, has_class_token: bool) -> tuple[int, int]:
        """(dominant patches, contextual tokens) of a pass of ``num_patches`` patch tokens: with ``keep``,
        floor(n keep) tokens of which round(10 / 64 of them) contextual, the rest dominant, the class
        token among them; refused where the pass cannot give them."""
        if self.keep is not None:
            total = int(kept_count(torch.tensor(num_patches), self.keep))
            contextual = math.floor(total * PAPER_CONTEXTUAL / (PAPER_DOMINANT + PAPER_CONTEXTUAL) + 0.5)
            dominant = total - contextual
        else:
            dominant, contextual = self.dominant, self.contextual
        patches = dominant - int(has_class_token)
        if dominant + contextual < 1:
            raise ValueError(f"{self.describe()} leaves no token of a tower pass of {num_patches} patch tokens: "
                             f"keep more")
        if patches < 0:
            raise ValueError(f"{self.describe()}: dominant counts the tower's class token, which every pass keeps; "
                             f"give at least 1")
        if patches + contextual > num_patches:
            raise ValueError(f"{self.describe()}: {patches} dominant patches and {contextual} contextual tokens need "
                             f"more than a tower pass's {num_patches} patch tokens")
        return patches, contextual

    def pass_tokens(self, num_patches: int, has_class_token: bool) -> int:
        return int(has_class_token) + sum(self.split(num_patches, has_class_token))

    def reduce(self, attention: TokenAttention, passes_per_side: int) -> Tensor:
        tokens = attention.tokens
        passes, n, width = tokens.shape
        dominant, contextual = self.split(n, attention.cls is not None)
        # a stable descending sort: ties to the earlier patch
        order = attention.importance.argsort(dim=-1, descending=True, stable=True)
        dominant_index = order[:, :dominant].sort(dim=-1).values
        rest_index = order[:, dominant:].sort(dim=-1).values  # the other patches, in grid order
        rest = _rows(tokens, rest_index)
        merged = _merged(rest, _rows(attention.keys, rest_index), contextual) if contextual else rest[:, :0]
        dominant_tokens = _rows(tokens, dominant_index)
        crops = passes_per_side**2
        if crops == 1:  # LLaVA-1.5's one pass an image
            cls = [] if attention.cls is None else [attention.cls[:, None]]
            return torch.cat([*cls, dominant_tokens, merged], dim=1)
        batch = passes // crops
        grid = math.isqrt(n)
        crop = torch.arange(passes, device=tokens.device)[:, None] % crops
        # a patch's place in the image's stitched (p g) x (p g) grid, row-major
        row = crop // passes_per_side * grid + dominant_index // grid
        col = crop % passes_per_side * grid + dominant_index % grid
        stitched = (row * passes_per_side * grid + col).reshape(batch, crops * dominant)
        dominant_tokens = _rows(dominant_tokens.reshape(batch, crops * dominant, width), stitched.argsort(dim=-1))
        cls = [] if attention.cls is None else [attention.cls.reshape(batch, crops, width)]
        return torch.cat([dominant_tokens, *cls, merged.reshape(batch, crops * contextual, width)], dim=1)

    def describe(self) -> str:
        if self.keep is not None:
            return f"VisionZip(keep={self.keep})"
        return f"VisionZip(dominant={self.dominant}, contextual={self.contextual})"


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, n, C) at ``index`` (B, m) -> (B, m, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _merged(hidden: Tensor, keys: Tensor, contextual: int) -> Tensor:
    """The ``contextual`` tokens of the patches left after the dominant ones (``hidden`` (B, r, C), their
    ``keys`` (B, r, hd), in grid order): targets uniformly among them, every other patch joins the target
    of its most similar key (cosine), and a contextual token is its target plus the mean of those that
    joined it."""
    batch, left, width = hidden.shape
    targets = torch.arange(0, left, max(1, left // contextual), device=hidden.device)[:contextual]
    is_target = torch.zeros(left, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    joins = (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=-1)  # (B, others)
    # summed and counted in float32: half precision counts no further than 256 exactly
    sums = unit.new_zeros(batch, contextual, width).scatter_add_(
        1, joins[..., None].expand(-1, -1, width), hidden[:, others].float())
    counts = unit.new_zeros(batch, contextual).scatter_add_(1, joins, unit.new_ones(joins.shape))
    return (hidden[:, targets].float() + sums / counts.clamp(min=1)[..., None]).to(hidden.dtype)
