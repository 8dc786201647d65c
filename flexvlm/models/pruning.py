"""Carrying out a token reduction (``flexvlm.reduction``) in the decoder loop: the sequence each layer
sees, its RoPE positions and masks, and the hidden states at full length again at the end.

At the prompt (a teacher-forced pass, or a generation's prefill) the sequence is compacted at each
stage: the tokens kept move to the front, in their order, each sample padded to the batch's longest
with invalid slots; the dropped tokens keep the hidden state they had when dropped. Each layer's KV
cache then holds its own stage's tokens, so a later decoding step builds one set of masks and
positions per stage (``step_inputs``) from what the prompt recorded (``Segment``). Tokens a reduction
makes of dropped ones (``TokenReduction.merged``) take slots of the compacted sequence, and of the cache,
like the tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexvlm.models.decoder import (
    AttentionInputs, DecoderLayer, KVCache, LanguageModel, build_attention_inputs, gather_rows,
)
from flexvlm.models.flex_attention import SelectingRows, mapped_layer, row_probs
from flexvlm.reduction import Stage, TokenReduction


@dataclass
class Segment:
    """The prompt's tokens that the layers from ``start`` on see (until the next stage)."""

    start: int
    index: Tensor  # (B, n) their positions in the prompt (-1: a token the reduction made, no prompt row)
    valid: Tensor  # (B, n) real tokens (False: padding of the compacted batch)
    image: Tensor  # (B, n) image tokens among them
    positions: Tensor  # (B, n) their RoPE positions
    shift: Tensor  # (B,) how far a token after the prompt moves back (renumbering reductions; else 0)

    @property
    def in_prompt(self) -> Tensor:
        """(B, n) the real tokens that are rows of the prompt."""
        return self.valid & (self.index >= 0)


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
        answer_starts = row_mask & ~torch.nn.functional.pad(row_mask[:, :-1], (1, 0), value=False)
        with torch.no_grad():  # which rows rate is no function of the weights to train
            raters = self.reduction.raters(embeds, self.image_mask & valid, valid, answer_starts)
        current = Segment(0, torch.arange(n, device=embeds.device).expand(batch, n), valid, self.image_mask & valid,
                          positions, positions.new_zeros(batch))
        self.segments = [current]
        num_images = current.image.sum(-1)
        stages = {stage.prune_before: stage for stage in self.stages}
        hidden, x, rating = embeds, embeds, None
        for i, layer in enumerate(llm.layers):
            if i in stages:
                if stages[i].rate_at == i:  # the coming layer's map, previewed on the full sequence
                    rating = self._previewed_rating(layer, x, inputs, raters)
                hidden = _write_back(hidden, x, current)
                current, x, raters = self._dropped(stages[i], rating, current, x, raters, num_images)
                self.segments.append(current)
                cos, sin = llm.rope(current.positions, embeds.dtype)
                inputs = build_attention_inputs(cos, sin, 0, current.valid)
            if i + 1 in stages and stages[i + 1].rate_at == i:  # this layer's own map rates for the next
                rows = SelectingRows.from_mask(raters, inputs)
                x, probs = llm.checkpointed(layer, x, inputs, cache, mapped_layer, rows, False)  # no map_grad
                rating = probs, rows.valid
            else:
                x = llm.checkpointed(layer, x, inputs, cache)
        return llm.final_norm(_write_back(hidden, x, current))

    def _previewed_rating(self, layer: DecoderLayer, x: Tensor, inputs: AttentionInputs,
                          raters: Tensor) -> tuple[Tensor, Tensor]:
        """The rating rows' attention in ``layer`` on its input ``x``, before the layer runs (on the shorter
        sequence), and which rows are real; q, k and v of every token, as PyramidDrop computes them."""
        rows = SelectingRows.from_mask(raters, inputs)
        attn = layer.self_attn
        q, k, _ = attn.qkv(layer.attention_input(x), inputs, None)
        return row_probs(attn, gather_rows(q, rows.rows), k, rows.visible, map_grad=False), rows.valid

    def _dropped(self, stage: Stage, rating: tuple[Tensor, Tensor], current: Segment, x: Tensor, raters: Tensor,
                 num_images: Tensor) -> tuple[Segment, Tensor, Tensor]:
        """The sequence after ``stage``'s drop, rated by ``rating`` (the rating rows' attention, their validity)."""
        probs, rater_valid = rating
        scores = self.reduction.scores(probs, rater_valid)
        keep = _keep(scores, current, self.reduction.counts(stage, probs, rater_valid, current.image, num_images))
        merged = self.reduction.merged(x, scores, current.image & ~keep)
        return self._compacted(current, keep, x, raters, stage.prune_before, merged)

    def _compacted(self, current: Segment, keep: Tensor, x: Tensor, raters: Tensor, start: int,
                   merged: tuple[Tensor, Tensor] | None) -> tuple[Segment, Tensor, Tensor]:
        """The tokens in ``keep`` (B, n) moved to the front, in order, with the ``merged`` tokens (if any)
        right after each sample's last image token."""
        renumber = self.reduction.renumber_positions
        if merged is not None and not renumber:
            raise ValueError(f"{self.reduction.describe()} merges tokens, which have no position of their own: "
                             "a reduction that merges renumbers its sequence (renumber_positions = True)")
        tokens, made = merged if merged is not None else (x[:, :0], keep[:, :0])
        width, extra = keep.shape[1], made.shape[1]
        # sort keys: a token's place, spaced so that the merged ones fit between the last image token and the next
        place = torch.arange(width, device=keep.device).expand_as(keep) * (extra + 1)
        after_image = torch.where(current.image, place, 0).amax(-1, keepdim=True)
        order, valid = _in_order(torch.cat((keep, made), 1),
                                 torch.cat((place, after_image + 1 + torch.arange(extra, device=keep.device)), 1))

        def ordered(values: Tensor, made_value: bool | int) -> Tensor:
            return torch.cat((values, values.new_full(made.shape, made_value)), 1).gather(1, order)

        positions = (valid.long().cumsum(-1) - 1).clamp(min=0) if renumber else current.positions.gather(1, order)
        dropped_real = current.valid.sum(-1) - valid.sum(-1)  # net of the merged tokens, which take slots
        shift = current.shift + dropped_real if renumber else current.shift
        segment = Segment(start, ordered(current.index, -1), valid, ordered(current.image, True) & valid, positions,
                          shift)
        x = torch.cat((x, tokens.to(x.dtype)), 1).gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        return segment, x, ordered(raters, False) & valid

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
        """(B, 1): ``image_fraction`` as ``SelectionRecord.row_fraction`` reports a selection's, every row alike."""
        return self.image_fraction()[:, None]


def _keep(scores: Tensor, current: Segment, counts: Tensor) -> Tensor:
    """(B, n) the tokens a stage keeps: every real text token, and each sample's ``counts`` image
    tokens of the highest score (ties: the earlier token)."""
    candidates = scores.masked_fill(~current.image, float("-inf"))
    order = candidates.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (current.valid & ~current.image) | (current.image & (rank < counts[:, None]))


def _in_order(slots: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool ``slots`` -> indices (B, K) of the True entries by ascending ``key`` (B, L), padded to the
    largest count K, and valid (B, K)."""
    counts = slots.sum(-1)
    order = key.masked_fill(~slots, int(key.max()) + 1).argsort(dim=-1, stable=True)[:, : int(counts.max())]
    return order, torch.arange(order.shape[1], device=slots.device) < counts[:, None]


def _write_back(hidden: Tensor, x: Tensor, segment: Segment) -> Tensor:
    """``hidden`` (B, N, D) at the prompt's length with the current states ``x`` of ``segment``'s real
    prompt tokens written at their places."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(segment.index)
    real = segment.in_prompt
    return hidden.index_put((rows[real], segment.index[real]), x[real])
