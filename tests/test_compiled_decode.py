"""The compiled decode step of static shapes (flexvlm.models.static_decode) against the uncompiled cached
step: the same logits (float32, within 1e-5) and tokens over a 32-token generation, one graph compiled, no
graph break, no recompile. A compile takes tens of seconds on CPU: one per test, the flex model with a
top-k budget in the default suite, the rest with make test-slow."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.models.generation import generate, generation_steps
from flexvlm.models.static_decode import StaticKVCache
from flexvlm.selection import AttentionSelection, CenterSelection, MassSelection, RandomSelection, SoftSelection

from test_generate import _model

NEW_TOKENS = 32


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _prompts():
    """Three left-padded prompts of different lengths."""
    torch.manual_seed(3)
    ids = torch.tensor([[0, 0, IMAGE_TOKEN_INDEX, 5, 6], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10],
                        [0, 4, IMAGE_TOKEN_INDEX, 3, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    return ids, mask, torch.randn(3, 3, 96, 96)


def _compiled_equals_uncompiled(model, device="cpu", tolerance=1e-5, batch=3):
    model = model.to(device)
    ids, mask, images = (t[:batch].to(device) for t in _prompts())
    reference = list(generation_steps(model, ids, mask, images, max_new_tokens=NEW_TOKENS))
    # the first compile is no recompile: any later one (a shape or guard that changed) raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        steps = list(generation_steps(model, ids, mask, images, max_new_tokens=NEW_TOKENS, compiled=True))
        assert counters["stats"]["unique_graphs"] == 1  # one graph for the 31 steps after the prefill
        assert not counters["graph_break"]
        assert len(steps) == NEW_TOKENS
        for ref, got in zip(reference, steps):
            torch.testing.assert_close(got.logits, ref.logits, atol=tolerance, rtol=tolerance)
            assert torch.equal(got.token, ref.token)
            if ref.hr_fraction is not None:
                torch.testing.assert_close(got.hr_fraction, ref.hr_fraction)
            assert got.masks.keys() == ref.masks.keys()
            for layer, mask_ref in ref.masks.items():
                assert torch.equal(got.masks[layer], mask_ref)
        # another generation of the same shapes runs the same graph
        again = generate(model, ids, mask, images, max_new_tokens=NEW_TOKENS, compiled=True)
        assert counters["stats"]["unique_graphs"] == 1
    assert again.tokens == torch.stack([s.token for s in reference], 1).tolist()


def test_compiled_flex_step_with_top_k_equals_uncompiled():
    _compiled_equals_uncompiled(_model("flex", AttentionSelection(top_k=3)))


@pytest.mark.slow
def test_compiled_flex_step_of_one_prompt_equals_uncompiled():
    """Batch 1: the previous token is a column of one, whose stride contiguous() would leave changing."""
    _compiled_equals_uncompiled(_model("flex", AttentionSelection(top_k=3)), batch=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_flex_step_with_cuda_graphs_equals_uncompiled():
    """mode="reduce-overhead" on CUDA: the step replayed as a CUDA graph (float32; kernels that may
    differ in the last bits from the uncompiled step's)."""
    _compiled_equals_uncompiled(_model("flex", AttentionSelection(top_k=3)), "cuda", tolerance=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode, selection", [
    ("flex", AttentionSelection(ratio=0.3)),
    ("flex", SoftSelection(top_k=3, sharpness=1.0)),
    ("flex", CenterSelection(top_k=3)),
    ("lr_only", None),
    ("xattn", None),
    ("hd", None),
], ids=["flex-ratio", "flex-soft", "flex-center", "lr_only", "xattn", "hd"])
def test_compiled_step_equals_uncompiled(mode, selection):
    _compiled_equals_uncompiled(_model(mode, selection))


@pytest.mark.parametrize("model, match", [
    (lambda: _model("flex", AttentionSelection(threshold=48.0)), "as many high-res tokens as the map decides"),
    (lambda: _model("flex", MassSelection(mass=0.5)), "as many high-res tokens as the map decides"),
    (lambda: _model("flex", flex_impl="release"), "release-style layer"),
    (lambda: _model("hd", reduction="fastv"), "token reduction"),
    (lambda: _model("flex", RandomSelection(top_k=3, seed=0)), "torch.Generator of its own"),
], ids=["threshold", "attention_mass", "release", "fastv", "random"])
def test_models_without_static_shapes_are_refused(model, match):
    ids, mask, images = _prompts()
    with pytest.raises(ValueError, match=match):
        generate(model(), ids, mask, images, max_new_tokens=2, compiled=True)


def test_compiled_decoding_needs_the_cache():
    ids, mask, images = _prompts()
    with pytest.raises(ValueError, match="cached decoding"):
        generate(_model("lr_only"), ids, mask, images, compiled=True, use_cache=False)


def test_fixed_budget_bounds_every_row():
    """The fixed width of a budget's selection holds every row's selection: top 3 of the 3 x 3 token blocks
    (27 tokens); a ratio of blocks cut to the image (padding cells excluded)."""
    ids, mask, images = _prompts()
    model = _model("flex", AttentionSelection(top_k=3))
    selector = model.prepare(ids, mask, images).high_res.selector
    assert selector.with_fixed_width().width == 27
    steps = list(generation_steps(model, ids, mask, images, max_new_tokens=3))
    assert all(int(m.flatten(1).sum(-1).max()) <= 27 for s in steps for m in s.masks.values())


def test_static_cache_writes_at_its_position():
    position = torch.tensor([3])
    cache = StaticKVCache(8, position)
    k = torch.randn(2, 1, 3, 4)
    prompt_k, _ = cache.update(0, k, k)
    assert prompt_k.shape == (2, 1, 3, 4) and len(cache) == 3
    step_k = torch.randn(2, 1, 1, 4)
    full_k, _ = cache.update(0, step_k, step_k)
    assert full_k.shape == (2, 1, 8, 4)
    assert torch.equal(full_k[:, :, :3], k) and torch.equal(full_k[:, :, 3:4], step_k)
