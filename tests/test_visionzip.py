"""VisionZip in hd mode, against a naive per-image implementation of its published rule: python loops
over crops and tokens, the tower layer's attention from an explicit softmax of the q / k its own
projection computed (timm) or from the library module's attention weights (open_clip), on tiny
randomly initialised towers."""

import math

import pytest
import torch
from test_reduction import left_padded_prompts

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.export import _refuse_what_has_no_place
from flexvlm.flops import DecoderShape, ImageCost, VisionShape, generation_cost, generation_flops
from flexvlm.lit_module import sequence_limits
from flexvlm.models.generation import generate
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.siglip import siglip_tower
from flexvlm.models.vision import OpenClipBackbone, PatchMLPBackbone, TimmBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.reduction import VisionZip

LLM = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
TOWERS = {  # 32 px, patch 8: 4 x 4 patches a pass; 3 blocks, the penultimate's output
    "timm_vit": lambda: TimmBackbone("vit_tiny_patch16_224", layer=-2, model_kwargs=dict(
        img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2)),
    "siglip": lambda: siglip_tower({"model_type": "siglip_vision_model", "hidden_size": 24, "intermediate_size": 48,
                                    "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32,
                                    "patch_size": 8}, layer=-2),
    "open_clip": lambda: OpenClipBackbone("ViT-B-16", layer=-2, model_kwargs=dict(
        embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=24, layers=3, head_width=12),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))),
}


def _model(tower="timm_vit", reduction=None, zoom=2, high_res_path="crops", **options):
    torch.manual_seed(0)
    return FlexVLM(TOWERS[tower](), llm=Llama(LlamaConfig(**LLM)), mode="hd", zoom=zoom, high_res_path=high_res_path,
                   reduction=reduction or VisionZip(dominant=5, contextual=3), **options).eval()


# -- the naive reference ---------------------------------------------------------------------------------
def _timm_layer(backbone, crop):
    """One crop (1, 3, n, n) through a timm tower: (patch states, class state or None, attention probs
    (heads, T, T), keys (heads, T, hd)) of the layer it returns, from its own q / k projection's output."""
    block = backbone.model.blocks[backbone.block_index]
    seen = {}
    hooks = [block.register_forward_hook(lambda m, args, out: seen.update(out=out[0])),
             block.attn.qkv.register_forward_hook(lambda m, args, out: seen.update(qkv=out[0]))]
    try:
        backbone(crop)
    finally:
        for hook in hooks:
            hook.remove()
    heads, width = block.attn.num_heads, block.attn.attn_dim
    q = seen["qkv"][:, :width].unflatten(-1, (heads, -1)).transpose(0, 1)
    k = seen["qkv"][:, width: 2 * width].unflatten(-1, (heads, -1)).transpose(0, 1)
    probs = torch.stack([(q[h] @ k[h].T / math.sqrt(q.shape[-1])).softmax(-1) for h in range(heads)])
    prefix = backbone.model.num_prefix_tokens
    return seen["out"][prefix:], seen["out"][0] if prefix else None, probs, k


def _open_clip_layer(backbone, crop):
    """The same through an open_clip tower, the probabilities nn.MultiheadAttention itself returns."""
    block = backbone.visual.transformer.resblocks[-1]
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.update(input=args[0][0])),
             block.register_forward_hook(lambda m, args, out: seen.update(out=out[0]))]
    try:
        backbone(crop)
    finally:
        for hook in hooks:
            hook.remove()
    h = block.ln_1(seen["input"])[None]
    _, probs = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    width = h.shape[-1]
    k = h[0] @ block.attn.in_proj_weight[width: 2 * width].T + block.attn.in_proj_bias[width: 2 * width]
    k = k.unflatten(-1, (block.attn.num_heads, -1)).transpose(0, 1)
    return seen["out"][1:], seen["out"][0], probs[0], k


def _naive_pass(states, cls, probs, keys, dominant, contextual):
    """VisionZip on one tower pass, token by token -> (dominant patch indices, class state, contextual states)."""
    n = states.shape[0]
    prefix = probs.shape[-1] - n
    heads = probs.shape[0]
    if cls is not None:  # attention from the class token, mean over heads
        importance = [sum(float(probs[h, 0, prefix + j]) for h in range(heads)) / heads for j in range(n)]
    else:  # attention received, mean over heads and every query
        importance = [float(probs[:, :, prefix + j].sum()) / (heads * probs.shape[1]) for j in range(n)]
    ranked = sorted(range(n), key=lambda j: (-importance[j], j))
    dominant_patches = sorted(ranked[:dominant])
    rest = sorted(ranked[dominant:])
    mean_keys = {j: sum(keys[h, prefix + j] for h in range(heads)) / heads for j in rest}
    targets = [rest[i] for i in range(0, len(rest), max(1, len(rest) // contextual))][:contextual] if contextual else []
    groups = {t: [] for t in targets}
    for j in rest if targets else []:  # no contextual tokens: the rest is dropped
        if j in groups:
            continue
        similarity = [float(torch.dot(mean_keys[j], mean_keys[t]) / (mean_keys[j].norm() * mean_keys[t].norm()))
                      for t in targets]
        groups[targets[similarity.index(max(similarity))]].append(j)
    merged = [states[t] + (sum(states[j] for j in groups[t]) / len(groups[t]) if groups[t] else 0) for t in targets]
    return dominant_patches, cls, merged


def naive_tokens(model, image):
    """One image (3, S, S) -> its VisionZip tokens before the projector (T, C), in sequence order."""
    encoder, reduction = model.encoder, model.reduction
    backbone = encoder.backbone
    z = 1 if encoder.high_res_path == "whole" else encoder.zoom
    side = image.shape[-1] // z
    grid = side // backbone.patch_size
    layer = _open_clip_layer if isinstance(backbone, OpenClipBackbone) else _timm_layer
    dominant_places, classes, merged = [], [], []
    for r in range(z):
        for c in range(z):
            crop = image[:, r * side: (r + 1) * side, c * side: (c + 1) * side][None]
            with torch.no_grad():
                states, cls, probs, keys = layer(backbone, crop)
            dominant, contextual = reduction.split(grid * grid, cls is not None)
            patches, cls, contextual_states = _naive_pass(states, cls, probs, keys, dominant, contextual)
            # a patch's place in the stitched (z grid) x (z grid) grid, row-major
            dominant_places += [((r * grid + j // grid) * z * grid + c * grid + j % grid, states[j]) for j in patches]
            classes += [] if cls is None else [cls]
            merged += contextual_states
    dominant_states = [state for _, state in sorted(dominant_places, key=lambda place: place[0])]
    if z == 1:  # one pass: the class token first (LLaVA-1.5)
        return torch.stack(classes + dominant_states + merged)
    return torch.stack(dominant_states + classes + merged)  # crops: LLaVA-NeXT's order


def naive_logits(model, ids, image):
    """One unpadded sample (1, t) with one placeholder: its text embeddings with the projected naive
    tokens in the placeholder's place, through the plain decoder -> (N, vocab)."""
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    with torch.no_grad():
        image_embeds = model.projector(naive_tokens(model, image))
        embeds = torch.cat((model.llm.embed(ids[:, :at])[0], image_embeds, model.llm.embed(ids[:, at + 1:])[0]))
        return model.llm.logits(model.llm(embeds[None]))[0]


# -- tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower, high_res_path, reduction", [
    ("timm_vit", "crops", VisionZip(dominant=5, contextual=3)),
    ("timm_vit", "whole", VisionZip(dominant=20, contextual=6)),
    ("timm_vit", "crops", VisionZip(keep=0.5)),  # 8 a crop: 7 dominant (the class token among them), 1 contextual
    ("timm_vit", "crops", VisionZip(dominant=4, contextual=0)),
    ("siglip", "crops", VisionZip(dominant=5, contextual=3)),
    ("siglip", "whole", VisionZip(dominant=20, contextual=6)),
    ("open_clip", "crops", VisionZip(dominant=5, contextual=3)),
    ("open_clip", "whole", VisionZip(keep=0.25)),
])
def test_image_tokens_match_the_naive_rule(tower, high_res_path, reduction):
    model = _model(tower, reduction, high_res_path=high_res_path)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        encoded = model.encoder.encode_reduced(images, lambda x: x, model.reduction)
    expected = torch.stack([naive_tokens(model, image) for image in images])
    assert encoded.in_sequence.shape[1] == model.placeholder_tokens
    torch.testing.assert_close(encoded.in_sequence, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded.kept_fraction, torch.full((2,), model.placeholder_tokens / 64))


def _right_padded_batch():
    """Two rows of other lengths, right-padded, the image at other places, one answer each."""
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7, 2, 0, 0], [4, 11, IMAGE_TOKEN_INDEX, 8, 9, 10, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:5] = ids[0, 3:5]
    labels[1, 5:] = ids[1, 5:]
    torch.manual_seed(2)
    return dict(input_ids=ids, attention_mask=mask, images=torch.randn(2, 3, 64, 64), labels=labels)


@pytest.mark.parametrize("tower", ["timm_vit", "open_clip"])
def test_teacher_forced_batch_matches_the_naive_rule_per_sample(tower):
    """A right-padded batch: each sample's logits are those of its own naive sequence; every layer
    sees the kept share of the 64 high-res tokens."""
    model, batch = _model(tower), _right_padded_batch()
    with torch.no_grad():
        out = model(**batch)
    kept = 4 * (5 + 3)  # 4 crops: the class token, 4 dominant patches, 3 contextual tokens
    for i in range(2):
        real = batch["attention_mask"][i].bool()
        expected = naive_logits(model, batch["input_ids"][i: i + 1, real], batch["images"][i])
        torch.testing.assert_close(out.logits[i, : expected.shape[0]], expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.sample_fraction, torch.full((2,), kept / 64))


@pytest.mark.parametrize("high_res_grad", [True, False])
def test_training_reaches_the_tower_with_high_res_grad_alone(high_res_grad):
    """The loss reaches the tower through the kept and merged tokens (the last block's MLP acts on the
    sequence's tokens alone) when the high-res path has gradients, as hd's does; the projector always."""
    model = _model(high_res_grad=high_res_grad).train()
    model(**_right_padded_batch()).loss.backward()
    last_mlp = model.encoder.backbone.model.blocks[1].mlp.fc2.weight.grad
    assert (last_mlp is not None and bool(last_mlp.abs().sum() > 0)) == high_res_grad
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())


@pytest.mark.parametrize("tower", ["timm_vit", "siglip"])
def test_cached_generation_matches_uncached_single_samples_and_the_naive_rule(tower):
    """Left-padded batch, KV cache: the same tokens as recomputing the whole sequence every step and as
    each sample alone, and every step's logits are the naive reference's on the sequence so far."""
    model = _model(tower)
    ids, mask, images = left_padded_prompts(64)
    cached = generate(model, ids, mask, images, max_new_tokens=5)
    uncached = generate(model, ids, mask, images, max_new_tokens=5, use_cache=False)
    assert cached.tokens == uncached.tokens
    kept = model.placeholder_tokens
    torch.testing.assert_close(cached.hr_fraction, torch.full((2,), kept / 64))
    torch.testing.assert_close(uncached.hr_fraction, cached.hr_fraction)
    for i in range(2):
        real = mask[i].bool()
        single = generate(model, ids[i: i + 1, real], mask[i: i + 1, real], images[i: i + 1], max_new_tokens=5)
        assert single.tokens[0] == cached.tokens[i]
        for step in range(5):
            sequence = torch.cat((ids[i: i + 1, real], torch.tensor([cached.tokens[i][:step]], dtype=torch.long)), 1)
            assert int(naive_logits(model, sequence, images[i])[-1].argmax()) == cached.tokens[i][step]


def test_a_budget_splits_as_the_paper():
    """keep: floor(n keep) tokens a pass, 10 / 64 of them contextual; the paper's LLaVA-1.5 settings of
    576 tokens, 54 + 10, 108 + 20, 162 + 30, the class token among the dominant ones."""
    for total, (dominant, contextual) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():
        assert VisionZip(keep=total / 576).split(576, True) == (dominant - 1, contextual)
        assert VisionZip(keep=total / 576).pass_tokens(576, True) == total
        assert VisionZip(keep=total / 576).split(576, False) == (dominant, contextual)
    assert VisionZip().keep == 64 / 576 and VisionZip().split(576, True) == (53, 10)
    assert VisionZip(dominant=54, contextual=10).split(576, True) == (53, 10)
    assert VisionZip(keep=0.125).split(64, True) == (6, 1)  # the regions task's crops: 8 of 64
    model = _model(reduction=VisionZip(keep=0.125))
    assert model.placeholder_tokens == 4 * 2  # 2 of a crop's 16 tokens: the class token and one patch
    limits = sequence_limits(model, max_new_tokens=4)
    assert limits.max_length == model.config.max_position_embeddings - 8 + 1


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not both"):
        VisionZip(keep=0.1, dominant=5, contextual=2)
    with pytest.raises(ValueError, match="together"):
        VisionZip(dominant=5)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        VisionZip(keep=0.0)
    with pytest.raises(ValueError, match="need more than a tower pass's 16 patch tokens"):
        _model(reduction=VisionZip(dominant=12, contextual=6))
    with pytest.raises(ValueError, match="leaves no token of a tower pass of 16 patch tokens"):
        _model(reduction=VisionZip(keep=0.05))
    with pytest.raises(ValueError, match="dominant counts the tower's class token"):
        _model(reduction=VisionZip(dominant=0, contextual=2))
    assert _model("siglip", VisionZip(dominant=0, contextual=2)).placeholder_tokens == 4 * 2  # no class token
    with pytest.raises(ValueError, match="only mode hd"):
        FlexVLM(TOWERS["timm_vit"](), llm="tiny", mode="flex", reduction="visionzip")


def test_a_tower_without_attention_is_refused_with_what_to_use():
    with pytest.raises(ValueError, match=r"VisionZip\(keep=0.11.*\) reads the attention of the vision tower's layer "
                                         r"whose output the model uses: PatchMLPBackbone has no attention layer.*"
                                         r"use a ViT tower: TimmBackbone"):
        FlexVLM(PatchMLPBackbone(image_size=32, patch_size=8), llm="tiny", mode="hd", reduction="visionzip")


def test_export_refuses_it():
    with pytest.raises(ValueError, match=r"the token reduction VisionZip\(dominant=5, contextual=3\)"):
        _refuse_what_has_no_place(_model("open_clip"), "release")


@pytest.mark.parametrize("tower, cls_token", [("timm_vit", True), ("siglip", False)])
def test_cost_model_matches_flop_counter(tower, cls_token):
    """The tower passes as in hd, the attention read again and the merge, then the projector and every
    layer on the kept tokens alone."""
    reduction = VisionZip(dominant=5, contextual=3)
    model = _model(tower, reduction)
    ids = torch.tensor([[0, 0, IMAGE_TOKEN_INDEX, 5, 6, 7], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11]])
    batch = {"prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "images": torch.randn(2, 3, 64, 64)}
    measured = generation_flops(model, batch, max_new_tokens=4, eos_token_id=None)
    vision = VisionShape(image_size=32, patch_size=8, width=24, depth=3, mlp_width=model.encoder.backbone.model
                         .blocks[0].mlp.fc1.out_features, layer=-2, cls_token=cls_token, heads=2)
    decoder = DecoderShape.from_config(model.config)
    predicted = generation_cost("hd", vision, decoder, ImageCost.llava(vision, zoom=2), 0, text_tokens=5, new_tokens=4,
                                reduction=reduction)
    assert measured == predicted.total
    plain = generation_cost("hd", vision, decoder, ImageCost.llava(vision, zoom=2), 0, text_tokens=5, new_tokens=4)
    assert predicted.vision == plain.vision and predicted.selection_overhead > 0
    assert predicted.projector == plain.projector * model.placeholder_tokens // 64
