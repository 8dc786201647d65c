"""Batched greedy generation with a KV cache, for every mode.

Prompts are left-padded, so every sample's next token sits in the last row. In ``flex`` mode the
selection is recomputed at every step from the current token's attention (as in the release), and
each step returns what it selected (``StepOutput.selection``); the HR K/V projections live in the
``HighResKVCache`` for the whole generation, so a (layer, HR token) pair is projected once, never
twice: lazily, when first selected (``high_res_kv="lazy"``, the default: cheapest for short answers),
or all at the prefill (``"prefill"``: cheaper per step for long generations). docs/benchmarks.md
measures the crossover. ``compiled=True`` runs the steps after the prefill as one compiled graph of
static shapes (``flexvlm.models.static_decode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from flexvlm.models.llm import KVCache
from flexvlm.models.static_decode import StaticDecoding
from flexvlm.sharding import all_processes

if TYPE_CHECKING:  # the model calls this module (FlexVLM.generate), not the other way round
    from flexvlm.models.vlm import FlexVLM


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per sample, up to (not including) EOS
    # (B,) mean over steps of the current token's HR fraction: in flex mode the share it selected, with a
    # token reduction the share of the image tokens a layer sees; 0 otherwise
    hr_fraction: Tensor
    prefill_masks: dict[int, Tensor] = field(default_factory=dict)  # FA layer -> (B, G, G) at the prompt's end


@dataclass
class Step:
    """One decoding step of every sample."""

    token: Tensor  # (B,) the greedy next token
    hr_fraction: Tensor | None  # (B,) HR fraction the current token's row used (None: no selection, no reduction)
    masks: dict[int, Tensor]  # FA layer -> (B, G, G) the current token's selection
    logits: Tensor  # (B, vocab) the current token's


@torch.no_grad()
def generation_steps(
    model: FlexVLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    images: Any,
    content_box: Tensor | None = None,
    max_new_tokens: int = 16,
    use_cache: bool = True,
    high_res_kv: str = "lazy",
    compiled: bool = False,
) -> Iterator[Step]:
    """Greedy decoding of left-padded prompts, one ``Step`` at a time (for streaming, early stops and
    per-step timing); ``generate`` collects them. ``use_cache=False`` recomputes the whole sequence
    at every step (with the same rows selecting): a slow reference the cached path must match.
    ``compiled``: the steps after the prefill are ``torch.compile``'s graph of static shapes, HR K/V
    projected at the prefill whatever ``high_res_kv`` says (``flexvlm.models.static_decode``, which
    names the models it refuses)."""
    if compiled and not use_cache:
        raise ValueError("compiled decoding is cached decoding; use_cache=False recomputes the whole sequence")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: the last column has padding")
    batch = input_ids.shape[0]
    generated = input_ids.new_zeros(batch, 0)
    if use_cache:
        inputs = model.prepare(input_ids, attention_mask, images, content_box,
                               high_res_kv="static" if compiled else high_res_kv)
        high_res, mask, cache = inputs.high_res, inputs.attention_mask, KVCache()
        static = StaticDecoding(model, inputs, max_new_tokens) if compiled else None
        if static is not None:  # the prefill fills the static step's caches
            high_res, cache = static.high_res, static.cache
        embeds = inputs.embeds
    for step in range(max_new_tokens):
        if use_cache:
            if step and static is not None:
                out = static.step(generated[:, -1])
            else:
                if step:
                    embeds = model.llm.embed(generated[:, -1:])
                    mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
                out = model.step(embeds, mask, cache, high_res, inputs.pruning, inputs.positions)
            logits, selection = out.logits[:, -1], out.selection
            # what spends high-res tokens, if anything: flex mode's selection, or a token reduction
            spent = selection if selection is not None else inputs.budget
            rows_fraction = spent.row_fraction() if spent is not None else None
            masks = selection.masks if selection is not None else {}
        else:
            ids = torch.cat((input_ids, generated), dim=1)
            full_mask = torch.cat((attention_mask, torch.ones_like(generated)), dim=1)
            out = model(ids, full_mask, images, content_box, select_last=step + 1)
            logits, rows_fraction, masks = out.logits[:, -1], out.row_fraction, out.selection_masks
        token = logits.argmax(-1)
        generated = torch.cat((generated, token[:, None]), dim=1)
        # the current token is the last selecting row
        yield Step(token, None if rows_fraction is None else rows_fraction[:, -1],
                   {layer: m[:, -1] for layer, m in masks.items()}, logits)


def generate(
    model: FlexVLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    images: Any,
    content_box: Tensor | None = None,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    high_res_kv: str = "lazy",
    compiled: bool = False,
) -> GenerationOutput:
    """Greedy decoding of left-padded prompts until ``max_new_tokens`` or every sample's EOS
    (``compiled``: see ``generation_steps``)."""
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, fractions, prefill_masks = [], [], {}
    sharded = model.is_sharded
    steps = generation_steps(model, input_ids, attention_mask, images, content_box, max_new_tokens, use_cache,
                             high_res_kv, compiled)
    for i, step in enumerate(steps):
        if i == 0:  # one selecting row per sample at prefill: the prompt's last
            prefill_masks = step.masks
        tokens.append(step.token)
        if step.hr_fraction is not None:
            fractions.append(step.hr_fraction)
        if eos_token_id is not None:
            finished |= step.token == eos_token_id
        # a sharded model gathers each layer from every process at every step: they stop together
        done = all_processes(finished.all()) if sharded else bool(finished.all())
        if done:
            break
    rows = [_until_eos(row, eos_token_id) for row in torch.stack(tokens, 1).tolist()]
    hr_fraction = torch.stack(fractions).mean(0) if fractions else torch.zeros(batch, device=input_ids.device)
    return GenerationOutput(tokens=rows, hr_fraction=hr_fraction, prefill_masks=prefill_masks)


def _until_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    return row[: row.index(eos_token_id)] if eos_token_id is not None and eos_token_id in row else row
