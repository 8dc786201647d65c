"""Carrying out a token reduction (``flexvlm.reduction``) in the decoder loop: the sequence each layer
sees, its RoPE positions and masks, and the hidden states at full length again at the end.

At the prompt (a teacher-forced pass, or a generation's prefill) the sequence is compacted at each
stage: the tokens kept move to the front, in their order, each sample padded to the batch's longest
with invalid slots; the dropped tokens keep the hidden state they had when dropped. Each layer's KV
cache then holds its own stage's tokens, so a later decoding step builds one set of masks and
positions per stage (``step_inputs``) from what the prompt recorded (``Segment``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from flexvlm.models.decoder import (
    AttentionInputs, DecoderLayer, KVCache, LanguageModel, build_attention_inputs, gather_rows,
)
from flexvlm.models.flex_attention import SelectingRows, mapped_layer, row_probs, selected_first
from flexvlm.reduction import Stage, TokenReduction, kept_count


@dataclass
class Segment:
    """The prompt's tokens that the layers from ``start`` on see (until the next stage)."""

    start: int
    index: Tensor  # (B, n) their positions in the prompt
    valid: Tensor  # (B, n) real tokens (False: padding of the compacted batch)
    image: Tensor  # (B, n) image tokens among them
    positions: Tensor  # (B, n) their RoPE positions
    shift: Tensor  # (B,) how far a token after the prompt moves back (renumbering reductions; else 0)


@dataclass
class SequencePruning:
    """One prompt's reduction: built at ``FlexVLM.prepare`` from the image tokens' places, filled by the
    pass over the prompt, read by every later decoding step."""

    reduction: TokenReduction
    image_mask: Tensor  # (B, N) the prompt's image tokens
    num_layers: int
    stages: list[Stage]
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def create(cls, reduction: TokenReduction, image_mask: Tensor, num_layers: int) -> SequencePruning:
        return cls(reduction, image_mask, num_layers, reduction.check(num_layers))

    # -- the prompt -------------------------------------------------------------------------------
    def run_prompt(self, llm: LanguageModel, embeds: Tensor, attention_mask: Tensor, row_mask: Tensor,
                   cache: KVCache | None) -> Tensor:
        """The decoder loop over a whole prompt (no cached keys before it): -> hidden states after the
        final norm, (B, N, D) in the prompt's order."""
        inputs = llm.attention_inputs(embeds, attention_mask, cache)
        batch, n = attention_mask.shape
        positions = llm.position_ids(attention_mask, batch, n, 0, embeds.device)
        valid = attention_mask.bool()
        # the rows where an answer starts rate the tokens
        raters = row_mask & ~torch.nn.functional.pad(row_mask[:, :-1], (1, 0), value=False)
        current = Segment(0, torch.arange(n, device=embeds.device).expand(batch, n), valid, self.image_mask & valid,
                          positions, positions.new_zeros(batch))
        self.segments = [current]
        num_images = current.image.sum(-1)
        stages = {stage.prune_before: stage for stage in self.stages}
        hidden, x, scores = embeds, embeds, None
        for i, layer in enumerate(llm.layers):
            if i in stages:
                if stages[i].rate_at == i:  # the coming layer's map, previewed on the full sequence
                    scores = self._previewed_scores(layer, x, inputs, raters)
                hidden = _write_back(hidden, x, current)
                keep = _keep(scores, current, kept_count(num_images, stages[i].keep))
                current, x, raters = self._compacted(current, keep, x, raters, i)
                self.segments.append(current)
                cos, sin = llm.rope(current.positions, embeds.dtype)
                inputs = build_attention_inputs(cos, sin, 0, current.valid)
            if i + 1 in stages and stages[i + 1].rate_at == i:  # this layer's own map rates for the next
                rows = SelectingRows.from_mask(raters, inputs)
                x, probs = llm.checkpointed(layer, x, inputs, cache, partial(mapped_layer, rows=rows, map_grad=False))
                scores = self.reduction.scores(probs, rows.valid)
            else:
                x = llm.checkpointed(layer, x, inputs, cache)
        return llm.final_norm(_write_back(hidden, x, current))

    def _previewed_scores(self, layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, raters: Tensor) -> Tensor:
        """(B, n) each token's score from the rating rows' attention in ``layer`` on its input ``x``, before
        the layer runs (on the shorter sequence); q, k and v of every token, as PyramidDrop computes them."""
        rows = SelectingRows.from_mask(raters, inputs)
        attn = layer.self_attn
        q, k, _ = attn.qkv(layer.attention_input(x), inputs, None)
        probs = row_probs(attn, gather_rows(q, rows.rows), k, rows.visible, map_grad=False)
        return self.reduction.scores(probs, rows.valid)

    def _compacted(self, current: Segment, keep: Tensor, x: Tensor, raters: Tensor,
                   start: int) -> tuple[Segment, Tensor, Tensor]:
        """The tokens in ``keep`` (B, n) moved to the front, in order."""
        order, valid = selected_first(keep)
        renumber = self.reduction.renumber_positions
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) if renumber else current.positions.gather(1, order)
        dropped_real = current.valid.sum(-1) - valid.sum(-1)
        shift = current.shift + dropped_real if renumber else current.shift
        segment = Segment(start, current.index.gather(1, order), valid, current.image.gather(1, order) & valid,
                          positions, shift)
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        return segment, x, raters.gather(1, order) & valid

    # -- later decoding steps ------------------------------------------------------------------------
    def step_inputs(self, llm: LanguageModel, inputs: AttentionInputs, attention_mask: Tensor,
                    dtype: torch.dtype) -> list[AttentionInputs]:
        """Per layer, the masks and positions of a decoding step after the prompt: each stage's cached
        prompt tokens, then every token after the prompt."""
        prompt_len = self.image_mask.shape[1]
        batch, n = inputs.cos.shape[:2]
        after = attention_mask[:, prompt_len:].bool()  # the tokens after the prompt, this step's included
        positions = llm.position_ids(attention_mask, batch, n, inputs.past_len, inputs.cos.device)
        per_segment = []
        for segment in self.segments:
            shifted = positions - segment.shift[:, None]
            cos, sin = llm.rope(shifted, dtype)
            key_valid = torch.cat((segment.valid, after), dim=1)
            per_segment.append(build_attention_inputs(cos, sin, key_valid.shape[1] - n, key_valid))
        starts = [segment.start for segment in self.segments]
        return [per_segment[sum(start <= i for start in starts) - 1] for i in range(len(llm.layers))]

    # -- what it cost ------------------------------------------------------------------------------------
    def image_fraction(self) -> Tensor:
        """(B,) the share of the sample's image tokens a layer sees, mean over the layers: what every
        row after the prompt uses (the ``hr_fraction`` that generation reports)."""
        total = self.segments[0].image.sum(-1).clamp(min=1)
        ends = [s.start for s in self.segments[1:]] + [self.num_layers]
        seen = sum((end - s.start) * s.image.sum(-1) for s, end in zip(self.segments, ends))
        return seen / (total * self.num_layers)

    def row_fraction(self) -> Tensor:
        """(B, 1): ``image_fraction`` as ``HighResState.row_fraction`` reports a selection's, every row alike."""
        return self.image_fraction()[:, None]


def _keep(scores: Tensor, current: Segment, counts: Tensor) -> Tensor:
    """(B, n) the tokens a stage keeps: every real text token, and each sample's ``counts`` image
    tokens of the highest score (ties: the earlier token)."""
    candidates = scores.masked_fill(~current.image, float("-inf"))
    order = candidates.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (current.valid & ~current.image) | (current.image & (rank < counts[:, None]))


def _write_back(hidden: Tensor, x: Tensor, segment: Segment) -> Tensor:
    """``hidden`` (B, N, D) at the prompt's length with the current states ``x`` of ``segment``'s real
    tokens written at their places."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(segment.index)
    return hidden.index_put((rows[segment.valid], segment.index[segment.valid]), x[segment.valid])
