"""The assembled VLM in its four modes, on every decoder family."""

import pytest
import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.flex_attention import FlexAttention
from flexvlm.models.gemma import Gemma, GemmaConfig
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.qwen2 import Qwen2, Qwen2Config
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AllSelection, AttentionSelection, SelectionStrategy, valid_grid

LLM = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
# a decoder object of each family, as a YAML's class_path builds it: Qwen2's q/k/v bias (which W_K',
# W_V' copy), Gemma's own head size, scaled embeddings and tied lm_head
DECODERS = {
    "llama": lambda: Llama(LlamaConfig(**LLM)),
    "qwen2": lambda: Qwen2(Qwen2Config(**LLM, num_kv_heads=2)),
    "gemma": lambda: Gemma(GemmaConfig(**LLM, num_kv_heads=1, head_size=12)),
}


def _model(mode, family=None, **kwargs):
    """The tiny preset with LLM's sizes, or a decoder object of ``family``."""
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8, embed_dim=24, hidden_dim=32)
    kwargs.setdefault("num_sa_layers", 1 if mode != "xattn" else 0)
    decoder = dict(llm="tiny", llm_overrides=LLM) if family is None else dict(llm=DECODERS[family]())
    return FlexVLM(backbone, mode=mode, **{**decoder, **kwargs})


def _batch(b=2):
    torch.manual_seed(1)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7, 2], [4, IMAGE_TOKEN_INDEX, 8, 9, 2]])[:b]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:] = ids[:, 3:]  # the last two tokens are the answer
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.randn(b, 3, 96, 96), labels=labels)


@pytest.mark.parametrize("mode,n_img", [("lr_only", 16), ("hd", 144), ("xattn", 16), ("flex", 16)])
def test_modes_forward(mode, n_img):
    model = _model(mode)
    out = model(**_batch())
    assert out.logits.shape == (2, 5 - 1 + n_img, LLM["vocab_size"])
    assert torch.isfinite(out.loss)
    fa_layers = [i for i, layer in enumerate(model.llm.layers) if isinstance(layer.self_attn, FlexAttention)]
    assert fa_layers == model.flex_layers
    if mode == "flex":
        assert set(out.selected_fraction) == {1, 2}
        assert all(0 < float(f) <= 1 for f in out.selected_fraction.values())


def test_splice_places_image_tokens_and_masks_labels():
    model = _model("lr_only")
    batch = _batch()
    inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    assert inputs.image_start.tolist() == [0, 1]
    lr = model.projector(model.encoder.encode_low_res(batch["images"]))
    assert torch.equal(inputs.embeds[0, :16], lr[0]) and torch.equal(inputs.embeds[1, 1:17], lr[1])
    assert torch.equal(inputs.embeds[1, 0], model.llm.embed(torch.tensor(4)))
    assert torch.equal(inputs.embeds[1, 17], model.llm.embed(torch.tensor(8)))
    assert inputs.labels[0].tolist() == [IGNORE_INDEX] * 18 + [7, 2]
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        model.prepare(torch.tensor([[5, 6]]), torch.ones(1, 2), batch["images"][:1])


@pytest.mark.parametrize("family", DECODERS)
def test_gradients_reach_every_trainable_parameter_in_flex_mode(family):
    model = _model("flex", family, high_res_grad=True)
    model(**_batch()).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


@pytest.mark.parametrize("family", DECODERS)
def test_flex_with_all_selected_equals_xattn_for_the_last_row(family):
    """With one FA layer, xattn (every row sees every HR token) and flex with every HR token selected
    by the last row give the same last-row logits: two code paths, one formula."""
    xattn = _model("xattn", family, num_sa_layers=2)
    flex = _model("flex", family, num_sa_layers=2, selection=AllSelection())
    flex.load_state_dict(xattn.state_dict())
    batch = _batch()
    del batch["labels"]
    with torch.no_grad():
        a = xattn(**batch).logits[:, -1]
        b = flex(**batch).logits[:, -1]
    assert (a - b).abs().max() < 1e-5


def test_batched_right_padding_matches_single_samples():
    model = _model("flex", selection=AttentionSelection(top_k=2))
    batch = _batch()
    batch["input_ids"] = torch.cat((batch["input_ids"], torch.zeros(2, 2, dtype=torch.long)), dim=1)
    batch["attention_mask"] = torch.cat((batch["attention_mask"], torch.zeros(2, 2, dtype=torch.long)), dim=1)
    batch["labels"] = torch.cat((batch["labels"], torch.full((2, 2), IGNORE_INDEX)), dim=1)
    with torch.no_grad():
        together = model(**batch)
        for i in range(2):
            single = {k: v[i : i + 1, :5] if k != "images" else v[i : i + 1] for k, v in _batch().items()}
            alone = model(**single)
            assert (together.logits[i, : alone.logits.shape[1]] - alone.logits[0]).abs().max() < 1e-5


def test_mode_and_placement_errors():
    with pytest.raises(ValueError, match="valid modes"):
        _model("flexi")
    with pytest.raises(ValueError, match="num_sa_layers"):
        _model("flex", num_sa_layers=0)
    with pytest.raises(ValueError, match="valid presets"):
        _model("flex", llm="vicuna-9000")
    with pytest.raises(ValueError, match="llm_overrides changes a preset"):
        _model("flex", "qwen2", llm_overrides={"num_layers": 2})


@pytest.mark.parametrize("family", DECODERS)
def test_built_on_the_meta_device_then_materialised(family):
    """No tensor has memory until materialised (``to_empty``, then each module's ``reset_parameters``,
    as Lightning's FSDP strategy does it); ``load_weights`` then ties the embeddings again and starts
    W_K', W_V' as W_K, W_V, as construction on a real device does."""
    with torch.device("meta"):
        model = _model("flex", family, high_res_grad=True)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.materialize("cpu")
    assert not model.is_meta
    reference = _model("flex", family)  # what a real device builds
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, reference.get_buffer(name)), name
    llm = model.llm
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == (family == "gemma")
    for i in model.flex_layers:
        attn = llm.layers[i].self_attn
        for which in "kv":
            assert torch.equal(getattr(attn, f"{which}_hr_proj").weight, getattr(attn, f"{which}_proj").weight)
    out = model(**_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_high_res_projections_start_as_copies():
    model = _model("flex")
    for i in model.flex_layers:
        attn = model.llm.layers[i].self_attn
        assert torch.equal(attn.k_hr_proj.weight, attn.k_proj.weight)
        assert torch.equal(attn.v_hr_proj.weight, attn.v_proj.weight)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = _model("flex", high_res_grad=True)
    checkpointed = _model("flex", high_res_grad=True, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    losses = []
    for model in (plain, checkpointed):
        model.train()
        loss = model(**_batch()).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1])
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name


class _Recording(AttentionSelection):
    """Attention selection that keeps every map it was handed, per layer."""

    def __init__(self):
        super().__init__(top_k=1)
        self.seen = {}

    def select(self, attn_map, ctx):
        self.seen[ctx.layer] = attn_map
        return super().select(attn_map, ctx)


def test_selection_maps_are_the_selecting_maps_with_their_gradient():
    strategy = _Recording()
    model = _model("flex", selection=strategy)
    assert not any(m.requires_grad for m in model(**_batch()).selection_maps.values())  # by default
    out = model(**_batch(), map_grad=True)
    assert set(out.selection_maps) == set(strategy.seen) == {1, 2}
    for layer, attn_map in out.selection_maps.items():
        assert attn_map.shape == (2, 2, 4, 4)  # two answer rows per sample, 4 x 4 LR grid
        assert torch.equal(attn_map.detach(), strategy.seen[layer]) and not strategy.seen[layer].requires_grad
        # head-summed softmax rows: the mass on the LR tokens is at most the number of heads
        assert bool((attn_map.sum((-1, -2)) <= LLM["num_heads"] + 1e-5).all())
    # the map that selects for layer 1 is layer 0's attention: a loss on it trains layer 0 only
    out.selection_maps[1][:, 0, 0, 0].sum().backward()
    assert model.llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.llm.layers[1].self_attn.q_proj.weight.grad is None


def test_low_res_only_reports_the_maps_a_flex_model_would_select_with():
    """Stage 1 of the protocol grounds a low-res-only model on these maps: they must be the ones the
    same weights select with in flex mode, and carry the gradient; the output stays the same."""
    low_res = _model("lr_only")
    flex = _model("flex", selection=AttentionSelection(top_k=1))
    flex.load_state_dict(low_res.state_dict(), strict=False)  # W_K', W_V' play no part in the maps
    plain = low_res(**_batch())
    assert plain.selection_maps == {}  # only asked for
    mapped = low_res(**_batch(), map_grad=True)
    reference = flex(**_batch(), map_grad=True).selection_maps
    assert set(mapped.selection_maps) == set(reference) == {1, 2}
    for layer, attn_map in mapped.selection_maps.items():
        torch.testing.assert_close(attn_map, reference[layer], rtol=0, atol=1e-6)
    torch.testing.assert_close(mapped.logits, plain.logits, rtol=0, atol=1e-6)
    mapped.selection_maps[2][:, 0, 0, 0].sum().backward()  # layer 1's map: trains layers 0 and 1
    assert low_res.llm.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert low_res.llm.layers[2].self_attn.q_proj.weight.grad is None


@pytest.mark.parametrize("selection", [AttentionSelection(top_k=2), AttentionSelection(threshold=48.0),
                                       AttentionSelection(top_k=14)])  # a union that covers most of the image
def test_release_style_flex_attention_gives_the_same_training_pass(selection):
    """flex_impl="release" (every row scores every HR key through an additive mask, the attention map
    materialised, as the authors' training) and the fused default: one formula, two costs."""
    fused = _model("flex", selection=selection, high_res_grad=True)
    release = _model("flex", selection=selection, high_res_grad=True, flex_impl="release")
    release.load_state_dict(fused.state_dict())
    out = [model(**_batch(), alpha=0.7) for model in (fused, release)]
    assert (out[0].logits - out[1].logits).abs().max() < 1e-5
    for model, o in zip((fused, release), out):
        o.loss.backward()
    grads = dict(release.named_parameters())
    for name, p in fused.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5), name
    with pytest.raises(ValueError, match="flex_impl"):
        _model("flex", flex_impl="eager")


@pytest.mark.parametrize("top_k", [2, 14])
def test_training_projects_the_union_of_the_selections_once(top_k):
    """W_K' runs on the union of a sample's selected HR tokens (padded to the batch's largest union),
    not once per selecting row and selected token; on every token once the union covers 3/4 of them."""
    model = _model("flex", selection=AttentionSelection(top_k=top_k), high_res_grad=True)
    projected = {}

    def record(layer):
        def hook(module, inputs, output):
            projected[layer] = inputs[0].shape
        return hook

    for i in model.flex_layers:
        model.llm.layers[i].self_attn.k_hr_proj.register_forward_hook(record(i))
    out = model(**_batch())
    for i in model.flex_layers:
        union = int(out.selection_masks[i].any(1).flatten(1).sum(-1).max())  # distinct tokens selected
        assert projected[i] == (2, union if 4 * union < 3 * 144 else 144, LLM["hidden_size"])
        assert (4 * union < 3 * 144) == (top_k == 2)  # both paths are exercised


class _FixedPerLayer(SelectionStrategy):
    """Each row's mask drawn at random per layer (seeded by it), whatever the map: what the decoder's
    record must hold is known beforehand."""

    def select(self, attn_map, ctx):
        generator = torch.Generator().manual_seed(ctx.layer)
        return torch.rand((*attn_map.shape[:2], *ctx.hr_shape), generator=generator) < 0.3


def _fixed_masks(layer, rows, hr_valid):
    """_FixedPerLayer's masks for ``rows`` (B, R) bool, cut to the image and to the real rows."""
    drawn = torch.rand((*rows.shape, 12, 12), generator=torch.Generator().manual_seed(layer)) < 0.3
    return drawn & hr_valid[:, None] & rows[:, :, None, None]


def test_the_returned_selection_record_is_what_the_rows_selected():
    """VLMOutput's masks and fractions (in training, with a padded selecting row and an image with
    padding) and generate's prefill masks and high-res fraction are the selections themselves, and
    their fractions computed by hand: count / the image's high-res tokens, averaged over real rows and
    FA layers."""
    model = _model("flex", selection=_FixedPerLayer())
    batch = _batch()
    batch["labels"][1, 3] = IGNORE_INDEX  # sample 1: one answer row (its second selecting row is padding)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.25, 1.0, 0.75]])  # (top, left, bottom, right)
    hr_valid = valid_grid(box, 12)  # the 12 x 12 high-res grid, sample 1's side columns padding
    available = hr_valid.flatten(1).sum(-1).float()
    real = torch.tensor([[True, True], [True, False]])
    out = model(**batch, content_box=box)
    masks = {layer: _fixed_masks(layer, real, hr_valid) for layer in (1, 2)}
    assert set(out.selection_masks) == set(out.selection_maps) == set(out.selected_fraction) == {1, 2}
    per_row = {}
    for layer, mask in masks.items():
        assert torch.equal(out.selection_masks[layer], mask)
        per_row[layer] = mask.flatten(2).sum(-1) / available[:, None]
        mean = sum(float(per_row[layer][b, r]) for b, r in real.nonzero().tolist()) / int(real.sum())
        assert float(out.selected_fraction[layer]) == pytest.approx(mean)
    torch.testing.assert_close(out.row_fraction, (per_row[1] + per_row[2]) / 2)
    sample = [float(out.row_fraction[0].mean()), float(out.row_fraction[1, 0])]
    torch.testing.assert_close(out.sample_fraction, torch.tensor(sample))

    ids, mask = batch["input_ids"], batch["attention_mask"]
    generated = model.generate(ids, mask, batch["images"], box, max_new_tokens=3)
    one_row = torch.ones(2, 1, dtype=torch.bool)  # the current token, at the prefill and every step
    step = {layer: _fixed_masks(layer, one_row, hr_valid) for layer in (1, 2)}
    assert set(generated.prefill_masks) == {1, 2}
    for layer, expected in step.items():
        assert torch.equal(generated.prefill_masks[layer], expected[:, 0])
    by_hand = sum(m.flatten(1).sum(-1) / available for m in (step[1][:, 0], step[2][:, 0])) / 2
    torch.testing.assert_close(generated.hr_fraction, by_hand)
