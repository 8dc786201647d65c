"""The whole model in reduced precision: bf16 / fp16 weights and activations, and bf16 autocast."""

import pytest
import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.generation import generate
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import MODES, FlexVLM
from flexvlm.selection import AttentionSelection

LLM = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)


def _model(mode):
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32)
    return FlexVLM(backbone, llm="tiny", llm_overrides=LLM, mode=mode, num_sa_layers=0 if mode == "xattn" else 1,
                   selection=AttentionSelection(top_k=3) if mode == "flex" else None, high_res_grad=True)


def _batch():
    torch.manual_seed(1)
    ids = torch.tensor([[0, IMAGE_TOKEN_INDEX, 5, 6, 7, 2], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -2:] = ids[:, -2:]
    return ids, mask, torch.randn(2, 3, 96, 96), labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_model_cast_to_half_precision_trains_and_generates(mode, dtype):
    ids, mask, images, labels = _batch()
    reference = _model(mode)
    with torch.no_grad():
        expected = reference(ids, mask, images, labels=labels).logits
    model = _model(mode).to(dtype)
    out = model(ids, mask, images.to(dtype), labels=labels)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the same model as in float32, up to half precision's rounding
    assert (out.logits.float() - expected).abs().max() < 0.1 * expected.abs().max()
    tokens = generate(model.eval(), ids[:, :-2], mask[:, :-2], images.to(dtype), max_new_tokens=3).tokens
    assert [len(t) for t in tokens] == [3, 3]


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_as_lightning_bf16_mixed(mode):
    ids, mask, images, labels = _batch()
    model = _model(mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, images, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
