"""FLOPs of a whole greedy generation per sample, vision included (the paper's efficiency measure)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexvlm.generate import generate
from flexvlm.models.vlm import FlexVLM


@torch.no_grad()
def generation_flops(model: FlexVLM, batch: dict[str, Any], max_new_tokens: int, eos_token_id: int | None) -> float:
    """Mean FLOPs per sample of ``generate`` on ``batch``. SDPA runs through its math backend so that
    FlopCounterMode sees its matrix products (the fused CPU kernels are invisible to it)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], batch.get("content_box"),
                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    return counter.get_total_flops() / batch["prompt_ids"].shape[0]
