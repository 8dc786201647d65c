"""The token-reduction interface: which image tokens of the sequence the decoder drops, and where.

The field's training-free peers of FlexAttention (FastV, PyramidDrop) shorten the sequence itself:
between two decoder layers, the image tokens that a few text rows attend to least are dropped, and
every later layer (and its KV cache) sees the shorter sequence. In flexvlm they act on ``hd`` mode,
whose sequence holds every high-res token, so their budget is the share of those tokens kept.

A reduction is a list of ``Stage`` s, each saying before which layer it drops, which layer's attention
rates the tokens, and how many image tokens remain after it; ``flexvlm.models.pruning`` carries it out.
Beyond its stages a reduction may choose its rating rows (``raters``), keep a count of its own per sample
(``counts``, e.g. from the raters' attention) and put tokens made of the dropped ones back into the
sequence (``merged``); by default the answer-start rows rate, a stage keeps its share and nothing returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexvlm.registry import Registry

if TYPE_CHECKING:  # a type only: the towers are the models' business
    from flexvlm.models.vision import TokenAttention

REDUCTION: Registry["TokenReduction | ImageTokenReduction"] = Registry("token reduction", group="flexvlm.reduction")


@dataclass(frozen=True)
class Stage:
    """Drop image tokens before layer ``prune_before``, rated by the attention that layer ``rate_at``
    computes on its input (``prune_before - 1``: the map the last layer before the drop used, as FastV;
    ``prune_before``: the map the first layer after it would use, as PyramidDrop), so that ``keep`` of
    the sample's image tokens (a share of all of them, not of those left) remain: exactly, or at most
    where the reduction's ``counts`` adapt to the sample (what ``flexvlm.flops`` predicts either way)."""

    prune_before: int
    rate_at: int
    keep: float


class TokenReduction(ABC):
    """Drops image tokens from the sequence between decoder layers (``FlexVLM(mode="hd", reduction=...)``).

    The rating rows (``raters``) are, by default, the rows where an answer starts: the last prompt token
    at inference, the last instruction token of every answer in training. A token's score is its
    attention from those rows, averaged over heads and rows."""

    renumber_positions: bool = False
    """False: kept tokens keep their positions (RoPE) as FastV; True: the sequence is renumbered after
    every drop, as PyramidDrop."""

    @abstractmethod
    def stages(self, num_layers: int) -> list[Stage]:
        """The stages for a decoder of ``num_layers`` layers, in layer order."""

    def check(self, num_layers: int) -> list[Stage]:
        """``stages``, refused with the reason when a decoder of ``num_layers`` layers cannot run them."""
        stages = self.stages(num_layers)
        previous, last_keep = 0, 1.0  # the layer where the previous drop took effect (the first sees all)
        for stage in stages:
            if not 1 <= stage.prune_before < num_layers:
                raise ValueError(f"{type(self).__name__} drops before layer {stage.prune_before}, outside 1 .. "
                                 f"{num_layers - 1} of a {num_layers}-layer decoder")
            # the first layer after a drop sees the shorter sequence: its map may rate for the next drop
            if (not previous <= stage.rate_at <= stage.prune_before or stage.prune_before - stage.rate_at > 1
                    or stage.prune_before <= previous):
                raise ValueError(f"{type(self).__name__}: stage {stage} rates at a layer that is not the one before "
                                 f"or at its drop, after the previous drop")
            if not 0.0 <= stage.keep <= last_keep:
                raise ValueError(f"{type(self).__name__}: stage {stage} keeps more than the stage before it")
            previous, last_keep = stage.prune_before, stage.keep
        return stages

    def raters(self, embeds: Tensor, image: Tensor, valid: Tensor, answer_starts: Tensor) -> Tensor:
        """(B, N) the rows whose attention rates the image tokens at every stage, chosen once on the
        prompt's input ``embeds`` (B, N, D), whose ``image`` and real (``valid``) tokens are marked, from
        the rows where an answer starts (``answer_starts``): by default those rows."""
        return answer_starts

    def counts(self, stage: Stage, probs: Tensor, rater_valid: Tensor, image: Tensor, num_images: Tensor) -> Tensor:
        """(B,) how many of the current image tokens (``image`` (B, keys), the keys of the rating rows'
        attention ``probs`` (B, heads, R, keys), ``rater_valid`` (B, R)) remain after ``stage``;
        ``num_images`` (B,): the sample's image tokens before the first drop. By default the stage's share
        of them."""
        return kept_count(num_images, stage.keep)

    def merged(self, x: Tensor, scores: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor] | None:
        """Tokens made of the image tokens a stage drops (``dropped`` (B, n) of the hidden states ``x``
        (B, n, D), their ``scores`` (B, n)) that enter the sequence right after the sample's last image
        token, as image tokens of the later stages: ((B, m, D) tokens, (B, m) valid). None (by default):
        the dropped tokens are gone. Merged tokens have no place in the prompt, so a reduction that makes
        them renumbers the sequence (``renumber_positions``)."""
        return None

    def scores(self, probs: Tensor, rater_valid: Tensor) -> Tensor:
        """(B, heads, R, keys) the rating rows' attention, ``rater_valid`` (B, R) -> (B, keys) scores:
        the mean over heads and rating rows."""
        weights = rater_valid.to(probs.dtype)
        per_row = probs.mean(1)  # (B, R, keys)
        return (per_row * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    def describe(self) -> str:
        return type(self).__name__


def stage_ratio(keep: float, starts: list[int], num_layers: int) -> float:
    """lambda such that stages from layers ``starts`` on, stage s keeping lambda^(s + 1) of the image tokens,
    give the layers from the first start a mean share ``keep``: the mean, sum over stages of (stage length)
    lambda^(s + 1) / (layers from the first start), grows with lambda, so bisection finds it."""
    lengths = [end - start for start, end in zip(starts, [*starts[1:], num_layers])]

    def mean_share(ratio: float) -> float:
        return sum(n * ratio ** (s + 1) for s, n in enumerate(lengths)) / sum(lengths)

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_share(middle) < keep else (low, middle)
    return (low + high) / 2


def kept_count(num_images: Tensor, keep: float) -> Tensor:
    """How many of a sample's ``num_images`` image tokens a stage keeps: floor(n * keep), as the
    peers' code rounds (a tiny tolerance so that 0.7 * 10 keeps 7, not 6)."""
    return torch.floor(num_images.to(torch.float64) * keep + 1e-9).long()


class ImageTokenReduction(ABC):
    """Reduces hd's image tokens before the decoder (``FlexVLM(mode="hd", reduction=...)``), as VisionZip,
    from what the vision tower's attention computed for them (``VisionBackbone.token_attention``): the
    encoder hands it each tower pass, and the decoder runs plain hd on the shorter sequence, the same
    tokens in every layer and its KV cache. No stages: its budget is the share of the image tokens kept."""

    @abstractmethod
    def pass_tokens(self, num_patches: int, has_class_token: bool) -> int:
        """The tokens one tower pass of ``num_patches`` patch tokens leaves in the sequence; refused
        (ValueError) with the reason where it cannot reduce such a pass."""

    @abstractmethod
    def reduce(self, attention: TokenAttention, passes_per_side: int) -> Tensor:
        """A batch's tower passes (each image's p x p crops row-major, p = ``passes_per_side``; p = 1: one pass
        an image) -> (B, p * p * pass_tokens, C): each image's tokens in their order in the sequence."""

    def describe(self) -> str:
        return type(self).__name__
