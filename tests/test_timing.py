"""Measured generation time: what is timed, and how the repeats become per-sample figures."""

import pytest
import torch

from flexvlm import timing
from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AttentionSelection


def _model_and_batch(batch=2):
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=16, hidden_dim=16)
    model = FlexVLM(backbone, llm="tiny", llm_overrides=dict(hidden_size=32, intermediate_size=64), mode="flex",
                    num_sa_layers=1, selection=AttentionSelection(ratio=0.25)).eval()
    ids = torch.randint(4, 50, (batch, 6))
    ids[:, 0] = IMAGE_TOKEN_INDEX
    return model, {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "images": torch.randn(batch, 3, 96, 96)}


def test_every_token_is_timed_and_no_end_token_stops_it():
    model, batch = _model_and_batch()
    times = timing.generation_seconds(model, batch, 5)
    assert len(times) == 5 and all(b > a > 0 for a, b in zip(times, times[1:]))


def test_latency_is_the_median_over_repeats_per_sample(monkeypatch):
    runs = iter([[9.0, 9.0, 9.0], [0.2, 0.3, 0.5], [0.4, 0.5, 0.6], [0.3, 0.7, 0.8]])  # a warm-up, then 3 repeats
    monkeypatch.setattr(timing, "generation_seconds", lambda *args, **kwargs: next(runs))
    model, batch = _model_and_batch(batch=2)
    latency = timing.generation_latency(model, batch, 3, repeats=3)
    # first tokens 0.2, 0.4, 0.3 -> 0.3 s; later steps 0.1, 0.2, 0.1, 0.1, 0.4, 0.1 -> 0.1 s; 2 samples
    assert latency["prefill_ms"] == pytest.approx(150.0) and latency["decode_ms"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.generation_latency(model, batch, 3, repeats=0)
