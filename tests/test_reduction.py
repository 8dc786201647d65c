"""Token reductions (FastV, PyramidDrop) in hd mode, against a naive per-sample implementation of
each method's published rule: python lists of kept positions, the sequence sliced by hand, the
rating attention computed by an explicit softmax."""

import math
from pathlib import Path

import pytest
import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.decoder import KVCache
from flexvlm.models.generation import generate
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.qwen2 import Qwen2, Qwen2Config
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.reduction import FastV, PyramidDrop, Stage, TokenReduction

LLM = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4)
DECODERS = {
    "llama": lambda: Llama(LlamaConfig(**LLM)),
    "qwen2": lambda: Qwen2(Qwen2Config(**LLM, num_kv_heads=2)),  # grouped queries, q/k/v bias
}
REDUCTIONS = {
    "fastv": lambda: FastV(k=2, r=0.75),
    "fastv_k1": lambda: FastV(k=1, r=0.5),
    "pyramid_drop": lambda: PyramidDrop(layers=[1, 2, 3], ratio=0.5),
}


def _model(reduction, family="llama"):
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32)
    return FlexVLM(backbone, llm=DECODERS[family](), mode="hd", reduction=reduction).eval()


def _batch():
    """Two right-padded rows of other lengths, the image at other places, one answer each."""
    torch.manual_seed(1)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7, 2, 0], [4, 11, IMAGE_TOKEN_INDEX, 8, 9, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:5] = ids[0, 3:5]
    labels[1, 4:] = ids[1, 4:]
    return dict(input_ids=ids, attention_mask=mask, images=torch.randn(2, 3, 96, 96), labels=labels)


# -- the naive reference ---------------------------------------------------------------------------------
def left_padded_prompts(image_size):
    """Two generation prompts, the first left-padded, and their images (seeded)."""
    torch.manual_seed(3)
    ids = torch.tensor([[0, 0, IMAGE_TOKEN_INDEX, 5, 6], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask, torch.randn(2, 3, image_size, image_size)


def two_answer_row(first_answer):
    """One training row with two answers, a one-token answer at ``first_answer`` and the last two tokens,
    and its 96 px image (seeded): -> ids, labels, images."""
    torch.manual_seed(2)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9, 10, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, first_answer] = ids[0, first_answer]
    labels[0, 6:] = ids[0, 6:]
    return ids, labels, torch.randn(1, 3, 96, 96)


def _rating(layer, h, positions, raters, llm):
    """The rating rows' attention in ``layer`` on its input ``h`` (1, n, D): an explicit causal
    softmax per head, averaged over heads and rating rows -> (n,)."""
    attn = layer.self_attn
    inputs = llm.attention_inputs(h, None, None, position_ids=positions[None])
    q, k, _ = attn.qkv(layer.attention_input(h), inputs, None)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    total = torch.zeros(h.shape[1])
    for r in raters:
        scores = torch.einsum("hd,hkd->hk", q[0, :, r], k[0, :, : r + 1]) / math.sqrt(q.shape[-1])  # (heads, r + 1)
        total[: r + 1] += scores.softmax(-1).mean(0)
    return total / len(raters)


def naive_hidden(model, ids, images, raters, reduction: TokenReduction):
    """One unpadded sample: the decoder run token list by token list, -> (N, D) hidden states after the
    final norm, a dropped token's state the one it had when dropped."""
    llm = model.llm
    inputs = model.prepare(ids, torch.ones_like(ids), images)
    h = inputs.embeds
    is_image = inputs.image_mask[0].tolist()
    places = list(range(h.shape[1]))  # the prompt position of each token still in the sequence
    positions = torch.arange(h.shape[1])
    stages = reduction.stages(len(llm.layers))
    num_images = sum(is_image)
    final = [None] * h.shape[1]
    scores = None
    for i, layer in enumerate(llm.layers):
        for stage in stages:
            if stage.rate_at == i:
                scores = _rating(layer, h, positions, [places.index(r) for r in raters], llm)
            if stage.prune_before == i:
                images_now = [j for j, p in enumerate(places) if is_image[p]]
                count = math.floor(num_images * stage.keep + 1e-9)
                best = sorted(images_now, key=lambda j: (-float(scores[j]), j))[:count]
                kept = [j for j, p in enumerate(places) if not is_image[p] or j in best]
                for j, p in enumerate(places):
                    if j not in kept:
                        final[p] = llm.final_norm(h[0, j])
                h, places = h[:, kept], [places[j] for j in kept]
                positions = torch.arange(len(kept)) if reduction.renumber_positions else positions[kept]
        layer_inputs = llm.attention_inputs(h, None, None, position_ids=positions[None])
        h = layer(h, layer_inputs, None)
    for j, p in enumerate(places):
        final[p] = llm.final_norm(h[0, j])
    return torch.stack(final)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("name", REDUCTIONS)
def test_teacher_forced_pass_matches_the_naive_rule_per_sample(name, family):
    model, batch = _model(REDUCTIONS[name](), family), _batch()
    with torch.no_grad():
        out = model(**batch)
        inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    for i in range(2):
        real = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i : i + 1, real]
        # the rating row: where the answer starts (the row that predicts its first token)
        first_label = int((inputs.labels[i] != IGNORE_INDEX).nonzero()[0])
        with torch.no_grad():
            expected = model.llm.logits(naive_hidden(model, ids, batch["images"][i : i + 1], [first_label - 1],
                                                     model.reduction))
        n = expected.shape[0]
        torch.testing.assert_close(out.logits[i, :n], expected, atol=2e-5, rtol=1e-4)


def test_pyramid_drop_in_training_rates_with_every_answer_start_and_trains():
    """Two answers in one row: PyramidDrop's training rule averages the two last instruction tokens'
    attention; the loss reaches every trainable parameter of the decoder through the kept tokens."""
    model = _model(PyramidDrop(layers=[1, 3], ratio=0.25)).train()
    ids, labels, images = two_answer_row(3)
    out = model(ids, torch.ones_like(ids), images, labels=labels)
    n_img = 144
    starts = [n_img + 1, n_img + 4]  # rows predicting the first token of each answer (after the 144 image tokens)
    with torch.no_grad():
        expected = model.llm.logits(naive_hidden(model, ids, images, starts, model.reduction))
    torch.testing.assert_close(out.logits[0].detach(), expected, atol=2e-5, rtol=1e-4)
    out.loss.backward()
    missing = [n for n, p in model.llm.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize("name", REDUCTIONS)
def test_cached_generation_matches_uncached_single_samples_and_the_naive_rule(name):
    """Left-padded batch, KV cache: the prefill drops once and every later step reads each layer's own
    stage of the cache (and, renumbering, its own positions). Recomputing the whole sequence every
    step (the same rating row: the prompt's last) and each sample alone give the same tokens; every
    cached step's logits are the naive reference's on the whole sequence so far."""
    model = _model(REDUCTIONS[name]())
    ids, mask, images = left_padded_prompts(96)
    cached = generate(model, ids, mask, images, max_new_tokens=6)
    uncached = generate(model, ids, mask, images, max_new_tokens=6, use_cache=False)
    assert cached.tokens == uncached.tokens
    torch.testing.assert_close(cached.hr_fraction, uncached.hr_fraction)
    assert bool((cached.hr_fraction < 1).all() and (cached.hr_fraction > 0).all())
    step_logits = _cached_step_logits(model, ids, mask, images, cached.tokens)
    for i in range(2):
        real = mask[i].bool()
        single = generate(model, ids[i : i + 1, real], mask[i : i + 1, real], images[i : i + 1], max_new_tokens=6)
        assert single.tokens[0] == cached.tokens[i]
        prompt = ids[i : i + 1, real]
        rater = prompt.shape[1] - 1 + 143  # the prompt's last row, after the 144 image tokens
        for step in range(6):
            sequence = torch.cat((prompt, torch.tensor([cached.tokens[i][:step]], dtype=torch.long)), dim=1)
            with torch.no_grad():
                hidden = naive_hidden(model, sequence, images[i : i + 1], [rater], model.reduction)
            torch.testing.assert_close(step_logits[step][i], model.llm.logits(hidden[-1]), atol=2e-5, rtol=1e-4)


def _cached_step_logits(model, ids, mask, images, tokens):
    """The last row's logits of a cached prefill and of each later step, feeding ``tokens``."""
    with torch.no_grad():
        inputs = model.prepare(ids, mask, images)
        cache, attention_mask, embeds = KVCache(), inputs.attention_mask, inputs.embeds
        logits = []
        for step in range(len(tokens[0])):
            if step:
                embeds = model.llm.embed(torch.tensor([[row[step - 1]] for row in tokens]))
                attention_mask = torch.cat((attention_mask, attention_mask.new_ones(len(tokens), 1)), dim=1)
            logits.append(model.step(embeds, attention_mask, cache, None, inputs.pruning).logits[:, -1])
    return logits


def test_fastv_keeps_the_last_tokens_favourites_in_layer_k_minus_1():
    """The rule itself, read from the pass: FastV(K=2, R=0.75) keeps floor(144 * 0.25) = 36 image
    tokens, those with the highest mean attention from the last token in layer 1; layers 2 and 3 see
    only them; the image share per layer is (2 * 144 + 2 * 36) / (4 * 144)."""
    model = _model(FastV(k=2, r=0.75))
    torch.manual_seed(4)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7]])
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        inputs = model.prepare(ids, torch.ones_like(ids), images)
        pruning = inputs.pruning
        row_mask = torch.zeros_like(ids[:, :1].expand(1, inputs.embeds.shape[1]), dtype=torch.bool)
        row_mask[0, -1] = True
        model.decode(inputs.embeds, inputs.attention_mask, row_mask, None, pruning=pruning)
        h = inputs.embeds
        h = model.llm.layers[0](h, model.llm.attention_inputs(h, None, None), None)
        scores = _rating(model.llm.layers[1], h, torch.arange(h.shape[1]), [h.shape[1] - 1], model.llm)
    expected = sorted(range(144), key=lambda j: (-float(scores[j]), j))[:36]
    kept = pruning.segments[1].index[0][pruning.segments[1].image[0]]
    assert sorted(kept.tolist()) == sorted(expected)
    assert [s.start for s in pruning.segments] == [0, 2]
    assert pruning.segments[1].positions[0].tolist() == pruning.segments[1].index[0].tolist()  # positions kept
    assert pruning.image_fraction().item() == pytest.approx((2 * 144 + 2 * 36) / (4 * 144))


def test_pyramid_drop_stages_halve_and_renumber():
    reduction = PyramidDrop(ratio=0.5)
    assert reduction.stages(32) == [Stage(8, 8, 0.5), Stage(16, 16, 0.25), Stage(24, 24, 0.125)]  # the paper's
    assert [s.prune_before for s in reduction.stages(4)] == [1, 2, 3]
    model = _model(PyramidDrop(layers=[1, 2, 3], ratio=0.5))
    ids = torch.tensor([[4, IMAGE_TOKEN_INDEX, 5, 6]])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 96, 96))
    pruning = _prompt_pass(model, ids)
    assert [int(s.image.sum()) for s in pruning.segments] == [144, 72, 36, 18]
    assert all(s.positions[0].tolist() == list(range(s.positions.shape[1])) for s in pruning.segments)
    assert out.sample_fraction.item() == pytest.approx((144 + 72 + 36 + 18) / (4 * 144))


def _prompt_pass(model, ids):
    """The prompt's pass (the last row rates), -> its record of what each stage kept."""
    with torch.no_grad():
        inputs = model.prepare(ids, torch.ones_like(ids), torch.randn(1, 3, 96, 96))
        row_mask = torch.zeros(inputs.embeds.shape[:2], dtype=torch.bool)
        row_mask[:, -1] = True
        model.decode(inputs.embeds, inputs.attention_mask, row_mask, None, pruning=inputs.pruning)
    return inputs.pruning


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="only mode hd"):
        FlexVLM(PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32), llm="tiny", mode="flex",
                reduction="fastv")
    with pytest.raises(ValueError, match="outside 1 .. 3"):
        _model(FastV(k=4))
    with pytest.raises(ValueError, match="R is a share"):
        FastV(r=1.5)
    with pytest.raises(ValueError, match="distinct and increasing"):
        PyramidDrop(layers=[3, 1])
    with pytest.raises(ValueError, match="valid names: .*fastv.*pyramid_drop"):
        _model("fastvv")


def test_readme_reduction_example_runs():
    """The reduction printed in the README drops what it says: all but 10 % of the 144 image tokens,
    before layer 2."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The peers: token reduction in hd mode", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    pruning = _prompt_pass(_model(namespace["DropOnce"]()), torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6]]))
    assert [(s.start, int(s.image.sum())) for s in pruning.segments] == [(0, 144), (2, 14)]


def test_a_budget_sets_each_methods_own_setting():
    """keep, the share of the image tokens the layers after the first drop see: FastV's 1 - R, and
    PyramidDrop's lambda whose stages average to it (layers 1, 2, 3 of 4: lambda, lambda^2 and lambda^3
    for a layer each)."""
    assert FastV(keep=0.1).r == pytest.approx(0.9) and FastV().r == 0.5
    stages = PyramidDrop(layers=[1, 2, 3], keep=0.2).stages(4)
    ratio = stages[0].keep
    assert sum(s.keep for s in stages) / 3 == pytest.approx(0.2, abs=1e-9)
    assert [s.keep for s in stages] == pytest.approx([ratio, ratio**2, ratio**3])
    assert PyramidDrop().stages(32)[0].keep == 0.5
    with pytest.raises(ValueError, match="not both"):
        FastV(r=0.5, keep=0.5)
    with pytest.raises(ValueError, match="not both"):
        PyramidDrop(ratio=0.5, keep=0.1)
