"""Batched greedy generation with a KV cache, for every mode.

Prompts are left-padded, so every sample's next token sits in the last row. In ``flex`` mode the
selection is recomputed at every step from the current token's attention (as in the release); the
HR K/V projections live in the ``HighResState`` for the whole generation, so a (layer, HR token)
pair is projected once, never twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexvlm.models.llm import KVCache
from flexvlm.models.vlm import FlexVLM


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per sample, up to (not including) EOS
    hr_fraction: Tensor  # (B,) mean fraction of HR tokens used per step (0 outside flex mode)
    prefill_masks: dict[int, Tensor] = field(default_factory=dict)  # FA layer -> (B, G, G) at the prompt's end


@torch.no_grad()
def generate(
    model: FlexVLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    images: Tensor,
    content_box: Tensor | None = None,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> GenerationOutput:
    """Greedy decoding of left-padded prompts. ``use_cache=False`` recomputes the whole sequence at
    every step (with the same rows selecting): a slow reference the cached path must match."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: the last column has padding")
    batch = input_ids.shape[0]
    device = input_ids.device
    generated = torch.zeros(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    fractions: list[Tensor] = []
    prefill_masks: dict[int, Tensor] = {}

    if use_cache:
        inputs = model.prepare(input_ids, attention_mask, images, content_box)
        state, mask, cache = inputs.high_res, inputs.attention_mask, KVCache()
        embeds = inputs.embeds
    for step in range(max_new_tokens):
        if use_cache:
            logits = model.step(embeds, mask, cache, state)[:, -1]
            fraction = state.sample_fraction() if state is not None and state.row_fractions else None
            masks = state.masks if state is not None else {}
        else:
            ids = torch.cat((input_ids, generated), dim=1)
            full_mask = torch.cat((attention_mask, torch.ones_like(generated)), dim=1)
            out = model(ids, full_mask, images, content_box, select_last=step + 1)
            logits, fraction, masks = out.logits[:, -1], out.sample_fraction, out.selection_masks
        if step == 0:  # one selecting row per sample at prefill: the prompt's last
            prefill_masks = {layer: m[:, -1] for layer, m in masks.items()}
        if fraction is not None:
            fractions.append(fraction)
        next_token = logits.argmax(-1)
        generated = torch.cat((generated, next_token[:, None]), dim=1)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
        if bool(finished.all()):
            break
        if use_cache:
            embeds = model.llm.embed(next_token[:, None])
            mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)

    tokens = [_until_eos(row, eos_token_id) for row in generated.tolist()]
    hr_fraction = torch.stack(fractions).mean(0) if fractions else torch.zeros(batch, device=device)
    return GenerationOutput(tokens=tokens, hr_fraction=hr_fraction, prefill_masks=prefill_masks)


def _until_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    return row[: row.index(eos_token_id)] if eos_token_id is not None and eos_token_id in row else row
