"""Measured time of greedy generation: to the first token (vision and prefill) and per later token.

Times on a shared machine are noisy; compare variants measured the same way, ideally in one run
(``scripts/bench_efficiency.py``), and read a protocol's times as the order of the methods, not as
figures that carry over to another machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from flexvlm.models.generation import generation_steps
from flexvlm.models.vlm import FlexVLM


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_seconds(model: FlexVLM, batch: dict[str, Any], new_tokens: int, high_res_kv: str = "lazy",
                       compiled: bool = False) -> list[float]:
    """Cumulative seconds from the start (vision included) to each of ``new_tokens`` greedy tokens of
    the batch's prompts (``prompt_ids``, ``prompt_mask``, ``images``, optional ``content_box``). No end
    token stops it, so every model generates the same number of tokens. ``compiled``: the compiled decode
    step (``generation_steps``), whose first generation of a shape compiles it."""
    device = batch["prompt_ids"].device
    _synchronize(device)
    start, times = time.perf_counter(), []
    for _ in generation_steps(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"],
                              batch.get("content_box"), max_new_tokens=new_tokens, high_res_kv=high_res_kv,
                              compiled=compiled):
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def generation_latency(model: FlexVLM, batch: dict[str, Any], new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per sample of the batch, medians over ``repeats`` generations after a warm-up one:
    ``prefill_ms``, to the first token (vision, splicing and the decoder's prefill), and ``decode_ms``,
    each later token (None for a one-token generation)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples = batch["prompt_ids"].shape[0]
    generation_seconds(model, batch, new_tokens)  # warm-up: first-call allocations and kernel choices
    runs = [generation_seconds(model, batch, new_tokens) for _ in range(repeats)]
    prefill = statistics.median(run[0] for run in runs)
    steps = [later - earlier for run in runs for earlier, later in zip(run, run[1:])]
    decode = statistics.median(steps) if steps else None
    return {"prefill_ms": 1e3 * prefill / samples, "decode_ms": None if decode is None else 1e3 * decode / samples}
