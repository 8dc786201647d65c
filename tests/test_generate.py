"""Cached batched generation against uncached and single-sample runs."""

import pytest
import torch

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.models.generation import generate, generation_steps
from flexvlm.models.flex_attention import FlexAttention
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AttentionSelection, MassSelection, SoftSelection

LLM = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)


def _model(mode, selection=None, **kwargs):
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32)
    return FlexVLM(backbone, llm="tiny", llm_overrides=LLM, mode=mode, num_sa_layers=0 if mode == "xattn" else 1,
                   selection=(selection or AttentionSelection(top_k=3)) if mode == "flex" else None, **kwargs).eval()


def _prompts():
    torch.manual_seed(3)
    ids = torch.tensor([[0, 0, IMAGE_TOKEN_INDEX, 5, 6], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask, torch.randn(2, 3, 96, 96)


def _cache_batch_and_single_agree(model, high_res_kv="lazy"):
    """Cached batched generation == uncached == each sample alone (tokens and HR fraction)."""
    ids, mask, images = _prompts()
    cached = generate(model, ids, mask, images, max_new_tokens=6, high_res_kv=high_res_kv)
    uncached = generate(model, ids, mask, images, max_new_tokens=6, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert torch.allclose(cached.hr_fraction, uncached.hr_fraction)
    for i in range(2):
        real = mask[i].bool()
        single = generate(model, ids[i : i + 1, real], mask[i : i + 1, real], images[i : i + 1], max_new_tokens=6)
        assert single.tokens[0] == cached.tokens[i]
        assert torch.allclose(single.hr_fraction[0], cached.hr_fraction[i])
    return cached


@pytest.mark.parametrize("mode", ["lr_only", "hd", "xattn", "flex"])
def test_cache_batch_and_single_agree(mode):
    cached = _cache_batch_and_single_agree(_model(mode))
    if mode == "flex":
        assert set(cached.prefill_masks) == {1, 2}
        assert cached.prefill_masks[1].shape == (2, 12, 12)
        assert ((cached.hr_fraction - 3 * 9 / 144).abs() < 1e-6).all()  # top-3 blocks of 3 x 3 every step


def test_eos_stops_and_is_cut():
    model = _model("flex")
    ids, mask, images = _prompts()
    first = generate(model, ids, mask, images, max_new_tokens=4)
    eos = first.tokens[0][1]  # pretend the second generated token of sample 0 is EOS
    out = generate(model, ids, mask, images, max_new_tokens=4, eos_token_id=eos)
    assert out.tokens[0] == first.tokens[0][: first.tokens[0].index(eos)]


def test_high_res_projection_of_a_token_happens_once_per_layer():
    model = _model("flex")
    ids, mask, images = _prompts()
    projected = {i: [] for i in model.flex_layers}
    for i in model.flex_layers:
        attn: FlexAttention = model.llm.layers[i].self_attn
        attn.k_hr_proj.register_forward_hook(lambda mod, inp, out, i=i: projected[i].append(inp[0]))
    generate(model, ids, mask, images, max_new_tokens=6)
    for i, chunks in projected.items():
        rows = torch.cat(chunks)
        # no feature vector is projected twice in the same layer
        assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]
        assert rows.shape[0] > 0


def test_rejects_right_padded_prompts():
    model = _model("lr_only")
    ids, mask, images = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(-1), images)


@pytest.mark.parametrize("selection", [AttentionSelection(threshold=48.0), MassSelection(mass=0.5)])
@pytest.mark.parametrize("high_res_kv", ["lazy", "prefill"])
def test_varying_selections_cache_batch_and_single_agree(high_res_kv, selection):
    """The release's threshold rule and the adaptive mass budget select a different number of HR tokens
    per sample and step: padded selections in a batch, and the same HR fraction with and without the
    cache (the current token's, averaged over steps)."""
    model = _model("flex", selection)
    cached = _cache_batch_and_single_agree(model, high_res_kv)
    ids, mask, images = _prompts()
    steps = list(generation_steps(model, ids, mask, images, max_new_tokens=6))
    fractions = torch.stack([step.hr_fraction for step in steps])
    assert len(set(fractions.flatten().tolist())) > 1  # the rule really varies the count
    assert torch.allclose(fractions.mean(0), cached.hr_fraction)


def test_prefill_mode_projects_every_token_once_at_the_first_step():
    model = _model("flex")
    ids, mask, images = _prompts()
    calls = []
    model.llm.layers[1].self_attn.k_hr_proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    generate(model, ids, mask, images, max_new_tokens=4, high_res_kv="prefill")
    assert calls == [(2, 144, LLM["hidden_size"])]


def test_soft_selection_generates_alike_cached_batched_and_alone():
    """The soft selection's key weights reach every decoding step the same way with and without the
    cache; at sharpness 0 it is the binary selection of the same budget, logits and all."""
    soft = _model("flex", SoftSelection(top_k=3, sharpness=1.0))
    _cache_batch_and_single_agree(soft)
    ids, mask, images = _prompts()
    binary, flat = _model("flex"), _model("flex", SoftSelection(top_k=3, sharpness=0.0))
    logits = [m(ids, mask, images, select_last=3).logits for m in (binary, flat, soft)]
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    assert (logits[0] - logits[2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="only flex_impl 'fused'"):
        _model("flex", SoftSelection(top_k=3), flex_impl="release")


def test_release_style_layer_generates_the_same_tokens():
    fused, release = _model("flex"), _model("flex", flex_impl="release")  # the same seed: the same weights
    ids, mask, images = _prompts()
    a, b = (generate(m, ids, mask, images, max_new_tokens=6) for m in (fused, release))
    assert a.tokens == b.tokens and torch.allclose(a.hr_fraction, b.hr_fraction)


# flex_attention compiles a kernel per padded shape (about a minute on 2 cores): with make test-slow
@pytest.mark.parametrize("backend", ["eager", pytest.param("flex", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["hd", "xattn", "flex"])
def test_attention_backends_give_the_same_logits_and_tokens(mode, backend):
    """The decoder's fused attention through another backend (sequence rows, selecting rows, cross-attention,
    decoding): the logits and greedy tokens are sdpa's (flex at inference: its CPU kernel has no backward
    in this torch)."""
    ids, mask, images = _prompts()
    models = {name: _model(mode, attn_backend=name) for name in ("sdpa", backend)}
    with torch.no_grad():
        logits = {name: m(ids, mask, images, select_last=3).logits for name, m in models.items()}
    tokens = {name: generate(m, ids, mask, images, max_new_tokens=4).tokens for name, m in models.items()}
    torch.testing.assert_close(logits[backend], logits["sdpa"], atol=1e-5, rtol=1e-5)
    assert tokens[backend] == tokens["sdpa"]
    for layer in models[backend].llm.layers:  # a FlexAttention layer's own attention (the family's) has it
        assert getattr(layer.self_attn, "attention", layer.self_attn).backend is models[backend].attn_backend


@pytest.mark.parametrize("mode", ["xattn", "flex"])
def test_inference_merging_the_high_res_call_equals_the_one_call_of_training(mode):
    """Without autograd the HR keys get a fused call of their own, merged in through the lse's; with
    autograd they are attended together with the sequence keys in one call: the same logits."""
    model = _model(mode)
    ids, mask, images = _prompts()
    with torch.no_grad():
        merged = model(ids, mask, images).logits
    with torch.enable_grad():
        one_call = model(ids, mask, images).logits
    torch.testing.assert_close(merged, one_call.detach(), atol=1e-5, rtol=1e-5)
