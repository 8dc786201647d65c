"""The token-reduction interface: which image tokens of the sequence the decoder drops, and where.

The field's training-free peers of FlexAttention (FastV, PyramidDrop) shorten the sequence itself:
between two decoder layers, the image tokens that a few text rows attend to least are dropped, and
every later layer (and its KV cache) sees the shorter sequence. In flexvlm they act on ``hd`` mode,
whose sequence holds every high-res token, so their budget is the share of those tokens kept.

A reduction is a list of ``Stage`` s, each saying before which layer it drops, which layer's attention
rates the tokens, and how many image tokens remain after it; ``flexvlm.models.pruning`` carries it out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from flexvlm.registry import Registry

REDUCTION: Registry["TokenReduction"] = Registry("token reduction", group="flexvlm.reduction")


@dataclass(frozen=True)
class Stage:
    """Drop image tokens before layer ``prune_before``, rated by the attention that layer ``rate_at``
    computes on its input (``prune_before - 1``: the map the last layer before the drop used, as FastV;
    ``prune_before``: the map the first layer after it would use, as PyramidDrop), so that ``keep`` of
    the sample's image tokens (a share of all of them, not of those left) remain."""

    prune_before: int
    rate_at: int
    keep: float


class TokenReduction(ABC):
    """Drops image tokens from the sequence between decoder layers (``FlexVLM(mode="hd", reduction=...)``).

    The rating rows are the rows where an answer starts: the last prompt token at inference, the last
    instruction token of every answer in training. A token's score is its attention from those rows,
    averaged over heads and rows."""

    renumber_positions: bool = False
    """False: kept tokens keep their positions (RoPE) as FastV; True: the sequence is renumbered after
    every drop, as PyramidDrop."""

    @abstractmethod
    def stages(self, num_layers: int) -> list[Stage]:
        """The stages for a decoder of ``num_layers`` layers, in layer order."""

    def check(self, num_layers: int) -> list[Stage]:
        """``stages``, refused with the reason when a decoder of ``num_layers`` layers cannot run them."""
        stages = self.stages(num_layers)
        previous, last_keep = 0, 1.0
        for stage in stages:
            if not 1 <= stage.prune_before < num_layers:
                raise ValueError(f"{type(self).__name__} drops before layer {stage.prune_before}, outside 1 .. "
                                 f"{num_layers - 1} of a {num_layers}-layer decoder")
            if not previous <= stage.rate_at <= stage.prune_before or stage.prune_before - stage.rate_at > 1:
                raise ValueError(f"{type(self).__name__}: stage {stage} rates at a layer that is not the one before "
                                 f"or at its drop, after the previous drop")
            if not 0.0 <= stage.keep <= last_keep:
                raise ValueError(f"{type(self).__name__}: stage {stage} keeps more than the stage before it")
            previous, last_keep = stage.prune_before + 1, stage.keep
        return stages

    def scores(self, probs: Tensor, rater_valid: Tensor) -> Tensor:
        """(B, heads, R, keys) the rating rows' attention, ``rater_valid`` (B, R) -> (B, keys) scores:
        the mean over heads and rating rows."""
        weights = rater_valid.to(probs.dtype)
        per_row = probs.mean(1)  # (B, R, keys)
        return (per_row * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    def describe(self) -> str:
        return type(self).__name__


def kept_count(num_images: Tensor, keep: float) -> Tensor:
    """How many of a sample's ``num_images`` image tokens a stage keeps: floor(n * keep), as the
    peers' code rounds (a tiny tolerance so that 0.7 * 10 keeps 7, not 6)."""
    return torch.floor(num_images.to(torch.float64) * keep + 1e-9).long()
