"""LLaVA-OneVision as a flexvlm architecture (flexvlm/architectures/llava_onevision/) against
transformers' LlavaOnevisionForConditionalGeneration, on a small random model saved offline with its
processor: 30 px views, patch 7 (g = 4, the views' last 2 pixels feeding no token, as 384 px with
patch 14 leaves 6), a 2-block SigLIP, a 3-layer Qwen2, pinpoints of 1 .. 3 views a side, anyres_max_2
(so that some grids are shrunk). Every tensor of the model is perturbed, so that a bias, a norm or the
image_newline left out shows in the logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flexvlm.architectures import architecture_of, from_pretrained
from flexvlm.architectures.llava_onevision import AnyresEncoder, OneVisionWeights, arguments, flexvlm_input_ids
from flexvlm.architectures.llava_onevision.preprocess import (
    OneVisionBatch, OneVisionProcessing, base_cell_of_grid_tokens, batch_inputs, image_layout,
)
from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import HFTokenizer
from flexvlm.models.decoder import KVCache
from flexvlm.models.vision import VisionBackbone
from flexvlm.selection import CenterSelection, NoSelection, RandomSelection
from flexvlm.weights import read_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)

TILE, PATCH, BUDGET = 30, 7, 2
PINPOINTS = [[TILE * rows, TILE * cols] for rows, cols in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]]
CORPUS = ["What is in the image? Describe it in detail.", "There are two cats on a red sofa.\nAnswer briefly."]
# (height, width): 2:1 (1 x 2 tiles, as is), 3:1 (rows cut), 10:7 tall (2 x 2 tiles, columns cut, shrunk),
# 1:1 (2 x 2 tiles, shrunk)
SIZES = [(100, 200), (80, 240), (100, 70), (120, 120)]
PROMPTS = ["<image>\nWhat is in the image?", "Describe it in detail. <image> There are two cats.",
           "There are two cats on a red sofa.<image>", "<image>"]
ATOL = 1e-4


def noise_image(size, seed=0) -> Image.Image:
    height, width = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """(folder with the processor and the model, transformers' model, preprocessing settings, flexvlm's
    tokenizer of the folder)."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    images = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(
        image_processor=images, tokenizer=fast, video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{BUDGET}")
    folder = tmp_path_factory.mktemp("onevision")
    processor.save_pretrained(folder)
    image_token = fast.convert_tokens_to_ids("<image>")
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "image_size": TILE, "patch_size": PATCH, "hidden_size": 32,
                       "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "layer_norm_eps": 1e-5, "vision_use_head": False},
        text_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(fast),
                     "rope_theta": 5000.0, "rms_norm_eps": 1e-5},
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=f"anyres_max_{BUDGET}",
        image_token_index=image_token, video_token_index=image_token + 1)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: every tensor gets noise
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.save_pretrained(folder)
    return folder, model, OneVisionProcessing.from_folder(folder), HFTokenizer(folder)


def _batch(onevision, mode="hd", padding_side="right", sizes=SIZES, prompts=PROMPTS) -> OneVisionBatch:
    folder, _, settings, tokenizer = onevision
    images = [noise_image(size, seed=i) for i, size in enumerate(sizes)]
    return batch_inputs(images, prompts[: len(sizes)], tokenizer, settings, padding_side=padding_side, mode=mode)


def _ids(onevision, batch):
    return flexvlm_input_ids(batch.input_ids, onevision[2].image_token_id)


def _theirs(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                     image_sizes=batch.image_sizes, **kwargs)


# ---------------------------------------------------------------- hd: the plain model


def test_hd_logits_match_transformers(onevision):
    folder, model, _, _ = onevision
    batch = _batch(onevision)
    layouts = batch.layouts
    # the batch takes every path of the packing: shrunk and not, rows cut and columns cut, right padding
    assert any(l.feature_grid != l.unpadded_grid for l in layouts)
    assert any(l.feature_grid == l.unpadded_grid for l in layouts)
    assert any(l.unpad_offset[0] > 0 for l in layouts) and any(l.unpad_offset[1] > 0 for l in layouts)
    assert (batch.attention_mask == 0).any()
    ours = from_pretrained(folder, mode="hd").eval()
    assert isinstance(ours.encoder, AnyresEncoder) and ours.selection is None
    with torch.no_grad():
        logits = ours(_ids(onevision, batch), batch.attention_mask, batch).logits
    expected = _theirs(model, batch).logits
    real = batch.attention_mask.bool()
    diff = (logits - expected)[real].abs().max().item()
    print(f"hd max abs logit difference: {diff:.3g}")
    assert diff < ATOL
    assert expected[real].abs().max() > 1  # logits of a size that a wrong token would show in


def test_hd_cached_steps_match_transformers_cache(onevision):
    """Prefill and 3 single-token steps with the KV cache, left-padded, against transformers' with its
    cache (the positions given as its generate computes them: real tokens counted)."""
    folder, model, _, _ = onevision
    batch = _batch(onevision, padding_side="left", sizes=SIZES[1:])
    ours = from_pretrained(folder, mode="hd").eval()
    steps = torch.tensor([[5, 17, 42], [7, 3, 99], [11, 11, 2]])
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        inputs = ours.prepare(_ids(onevision, batch), mask, batch)
        cache = KVCache()
        ours_logits = [ours.step(inputs.embeds, inputs.attention_mask, cache, None).logits[:, -1]]
        out = _theirs(model, batch, position_ids=positions, use_cache=True)
        their_logits, their_cache = [out.logits[:, -1]], out.cache
        for i in range(steps.shape[1]):
            token = steps[:, i: i + 1]
            mask = torch.cat((mask, mask.new_ones(len(mask), 1)), dim=1)
            positions = positions[:, -1:] + 1
            ours_logits.append(ours.step(ours.llm.embed(token), mask, cache, None).logits[:, -1])
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=their_cache, use_cache=True)
            their_logits.append(out.logits[:, -1])
            their_cache = out.cache
    diff = max((a - b).abs().max().item() for a, b in zip(ours_logits, their_logits))
    print(f"hd cached max abs logit difference: {diff:.3g}")
    assert len(cache) == batch.input_ids.shape[1] + 3 and diff < ATOL
    assert (ours_logits[-1] - ours_logits[-2]).abs().max() > 0.1  # the steps see their tokens


def test_hd_generate_matches_transformers_generate(onevision):
    folder, model, _, _ = onevision
    batch = _batch(onevision, padding_side="left")
    ours = from_pretrained(folder, mode="hd").eval()
    tokens = ours.generate(_ids(onevision, batch), batch.attention_mask, batch, max_new_tokens=5).tokens
    with torch.no_grad():
        theirs = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                pixel_values=batch.pixel_values, image_sizes=batch.image_sizes, max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    assert tokens == theirs[:, batch.input_ids.shape[1]:].tolist()
    assert len({tuple(t) for t in tokens}) > 1  # the samples' answers differ: the images matter


def test_hd_other_settings_match_transformers(onevision, tmp_path):
    """Tied embeddings (saved once: save_pretrained leaves lm_head out), no projector biases, and an
    earlier feature layer (hidden_states[-2], the first of 2 blocks' output)."""
    folder, model, _, _ = onevision
    shutil.copy(folder / "processor_config.json", tmp_path)
    shutil.copy(folder / "tokenizer.json", tmp_path)
    config = model.config.to_dict()
    config["text_config"]["tie_word_embeddings"] = True
    config.update(multimodal_projector_bias=False, vision_feature_layer=-2)
    config = LlavaOnevisionConfig(**{k: v for k, v in config.items()
                                     if k not in ("model_type", "transformers_version")})
    torch.manual_seed(1)
    other = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    other.eval().save_pretrained(tmp_path)
    saved = read_checkpoint(tmp_path)
    assert "language_model.lm_head.weight" not in saved and "multi_modal_projector.linear_1.bias" not in saved
    batch = _batch(onevision)
    ours = from_pretrained(tmp_path, mode="hd").eval()
    assert ours.llm.lm_head.weight is ours.llm.model.embed_tokens.weight and len(ours.encoder.tower.model.blocks) == 1
    with torch.no_grad():
        logits = ours(_ids(onevision, batch), batch.attention_mask, batch).logits
    real = batch.attention_mask.bool()
    diff = (logits - _theirs(other, batch).logits)[real].abs().max().item()
    print(f"hd (tied, no projector bias, layer -2) max abs logit difference: {diff:.3g}")
    assert diff < ATOL


# ---------------------------------------------------------------- lr_only, flex, xattn


def _reference_lr_only(model, batch):
    """The low-res sequence from transformers' own modules: the tower's hidden_states[-1] of each base
    view, its projector, its pack_image_features on an image that is its own only view (the base view,
    then one image_newline), its language model on the embeddings, its head."""
    inner = model.model
    with torch.no_grad():
        hidden = inner.vision_tower(batch.pixel_values[:, 0], output_hidden_states=True).hidden_states[-1]
        features = inner.multi_modal_projector(hidden)
        packed, lengths = inner.pack_image_features([f[None] for f in features], batch.image_sizes,
                                                    image_newline=inner.image_newline)
        embeds = inner.get_input_embeddings()(batch.input_ids)
        image = (batch.input_ids == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image, torch.cat(packed))
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        return model.lm_head(hidden), lengths


def test_lr_only_matches_transformers_modules(onevision):
    folder, model, settings, _ = onevision
    batch = _batch(onevision, mode="lr_only")
    g = settings.view_tokens
    assert ((batch.input_ids == settings.image_token_id).sum(-1) == g * g + 1).all()
    expected, lengths = _reference_lr_only(model, batch)
    assert lengths.tolist() == [g * g + 1] * len(SIZES)  # the base view and one newline
    ours = from_pretrained(folder, mode="lr_only").eval()
    with torch.no_grad():
        logits = ours(_ids(onevision, batch), batch.attention_mask, batch).logits
    real = batch.attention_mask.bool()
    diff = (logits - expected)[real].abs().max().item()
    print(f"lr_only max abs logit difference: {diff:.3g}")
    assert diff < ATOL
    # and flex without any high-res token is that same model: its sequence is lr_only's
    flex = from_pretrained(folder, mode="flex", selection=NoSelection()).eval()
    with torch.no_grad():
        flex_logits = flex(_ids(onevision, batch), batch.attention_mask, batch).logits
    assert (flex_logits - expected)[real].abs().max().item() < ATOL


@pytest.mark.parametrize("mode, selection", [
    ("flex", None), ("flex", RandomSelection(ratio=0.3, seed=0)), ("flex", CenterSelection(ratio=0.3)), ("xattn", None),
], ids=["flex-attention", "flex-random", "flex-center", "xattn"])
def test_flex_and_xattn_train_and_generate(onevision, mode, selection):
    folder, _, settings, _ = onevision
    kwargs = {"selection": selection} if selection is not None else {}
    model = from_pretrained(folder, mode=mode, num_sa_layers=1, **kwargs)
    batch = _batch(onevision, mode=mode, prompts=[p + " There are two cats." for p in PROMPTS])
    ids, mask = _ids(onevision, batch), batch.attention_mask
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, length in enumerate(mask.sum(-1).tolist()):  # the last 3 real tokens are the answer
        labels[b, length - 3: length] = ids[b, length - 3: length]
    model.train()
    out = model(ids, mask, batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    layer = model.llm.layers[1].self_attn
    for name, param in [("image_newline", model.encoder.image_newline), ("projector", model.projector[0].weight),
                        ("W_K'", layer.k_hr_proj.weight), ("W_V'", layer.v_hr_proj.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    canvas = (max(l.feature_grid[0] for l in batch.layouts), max(l.feature_grid[1] for l in batch.layouts))
    masks = out.selection_masks[2] if mode == "flex" else None
    if masks is not None:
        assert masks.shape[-2:] == canvas and masks.any()
    model.eval()
    left = _batch(onevision, mode=mode, padding_side="left")
    generated = model.generate(_ids(onevision, left), left.attention_mask, left, max_new_tokens=3)
    assert [len(t) for t in generated.tokens] == [3] * len(SIZES)
    if mode == "flex":
        assert ((generated.hr_fraction > 0) & (generated.hr_fraction <= 1)).all()


class ViewStub(VisionBackbone):
    """A tower whose token (i, j) of a view is (the view's first pixel, i, j)."""

    def __init__(self) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.embed_dim = TILE, PATCH, 3
        self.mean = self.std = (0.5, 0.5, 0.5)

    def _patch_tokens(self, images):
        g = images.shape[-1] // PATCH
        i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        where = torch.stack((i, j), -1).flatten(0, 1).float().expand(len(images), -1, -1)
        return torch.cat((images[:, 0, :1, :1].flatten(1)[:, None].expand(-1, g * g, 1), where), dim=-1)


def test_high_res_canvas_by_hand(onevision):
    """Views filled with distinct constants, 10 b + view: each grid token lands where transformers'
    stitching and unpadding put it, on a canvas of the batch's largest grid."""
    _, _, settings, _ = onevision
    encoder = AnyresEncoder(ViewStub(), 3, PINPOINTS, BUDGET)
    sizes = [(56, 100), (120, 120)]  # 2 x 2 tiles: 4 x 8 after 2 rows cut at the top; 8 x 8 shrunk to 5 x 5
    layouts = [image_layout(size, settings) for size in sizes]
    assert [(l.unpad_offset, l.feature_grid) for l in layouts] == [((2, 0), (4, 8)), ((0, 0), (5, 5))]
    pixels = torch.zeros(2, 5, 3, TILE, TILE)
    for b in range(2):
        for view in range(5):
            pixels[b, view] = 10 * b + view
    images = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}
    out = encoder.encode(images, lambda x: x, "flex")
    layout, canvas = out.layout, out.high_res.view(2, 5, 8, 3)
    assert layout.lr_shape == (4, 4) and layout.hr_shape == (5, 8)
    assert layout.hr_sizes.tolist() == [[4, 8], [5, 5]]
    # sample 0, canvas (3, 5): stitched row 3 + 2 = 5 -> tile row 1, token row 1; column 5 -> tile column 1,
    # token column 1: view 1 + 2 * 1 + 1 = 4
    assert canvas[0, 3, 5].tolist() == [4, 1, 1]
    # canvas (0, 2): stitched row 2 -> tile row 0, token row 2; column 2 -> tile 0: view 1
    assert canvas[0, 0, 2].tolist() == [1, 2, 2]
    for r in range(4):
        for c in range(8):
            view = 1 + (r + 2) // 4 * 2 + c // 4
            assert canvas[0, r, c].tolist() == [view, (r + 2) % 4, c % 4], (r, c)
    assert (canvas[0, 4] == 0).all() and (canvas[1, :, 5:] == 0).all()  # beyond each sample's grid
    assert (canvas[1, :5, :5, 0] > 10).all() and (canvas[1, :5, :5, 0] < 15).all()  # sample 1's tiles, blended
    assert layout.hr_valid.tolist() == (layout.hr_cell >= 0).tolist()
    assert layout.hr_valid[0, :4].all() and not layout.hr_valid[0, 4].any() and not layout.hr_valid[1, :, 5:].any()
    assert layout.lr_valid.all()
    for b, l in enumerate(layouts):
        h, w = l.feature_grid
        assert torch.equal(layout.hr_cell[b, :h, :w], base_cell_of_grid_tokens(l))
        assert (layout.hr_cell[b, h:] == -1).all() and (layout.hr_cell[b, :, w:] == -1).all()
    # the sequence: the base view (view 0) and image_newline
    newline = encoder.image_newline.detach()
    assert out.in_sequence.shape == (2, 17, 3) and out.counts is None
    assert (out.in_sequence[:, :16, 0] == torch.tensor([[0.0], [10.0]])).all()
    assert torch.equal(out.in_sequence[:, 16], newline.expand(2, 3))
    # hd packs the same grid, each row followed by the newline, after the base view
    hd = encoder.encode(images, lambda x: x, "hd")
    assert hd.counts.tolist() == [16 + 4 * 9, 16 + 5 * 6]
    rows = hd.in_sequence[0, 16: 16 + 36].view(4, 9, 3)
    assert torch.equal(rows[:, :8], canvas[0, :4]) and torch.equal(rows[:, 8], newline.expand(4, 3))
    with pytest.raises(ValueError, match="no content_box"):
        encoder.encode(images, lambda x: x, "flex", content_box=torch.zeros(2, 4))


# ---------------------------------------------------------------- folders, layouts, refusals


def test_architecture_of(onevision, tmp_path):
    assert architecture_of(onevision[0]).name == "llava-onevision"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(ValueError, match=r"model_type 'paligemma'.* is no architecture flexvlm builds; it builds "
                                         r".*llava-onevision"):
        architecture_of(tmp_path)


def _variant(folder, tmp_path, rename):
    """The folder's model with its tensors renamed (config.json only, no processor)."""
    shutil.copy(folder / "config.json", tmp_path)
    state = read_checkpoint(folder)
    save_file({rename(k): v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    return tmp_path


def _module_tree(name):  # transformers 5's in-memory names (4.52+ save_pretrained)
    for old, new in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")]:
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(name)


@pytest.mark.parametrize("rename", [
    lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),  # the hub's llava-hf folders, 4.x
    _module_tree,
    lambda k: _module_tree(k).replace("model.vision_tower.", "model.vision_tower.vision_model."),
], ids=["hub", "module-tree", "module-tree-vision-model"])
def test_weight_layouts(onevision, tmp_path, rename):
    """What transformers 5.24 saves (the original layout, the SigLIP without its vision_model level), the
    hub's, and transformers' module tree all load, to the same tensors; transformers reads each too."""
    folder, model, _, _ = onevision
    assert "language_model.model.embed_tokens.weight" in read_checkpoint(folder)  # what save_pretrained wrote
    variant = _variant(folder, tmp_path, rename)
    reference = dict(from_pretrained(folder, mode="flex").state_dict())
    loaded = from_pretrained(variant, mode="flex").state_dict()
    assert reference.keys() == loaded.keys() and all(torch.equal(reference[k], loaded[k]) for k in reference)
    theirs = LlavaOnevisionForConditionalGeneration.from_pretrained(variant).state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("language_model.model.layers.1.self_attn.q_proj.bias"),
     r"missing \(1\):\s+model.layers.1.self_attn.q_proj.bias \(32,\)"),
    (lambda s: s.update(image_newline=torch.zeros(31)),
     r"\(image_newline\)[\s\S]*weight: checkpoint \(31,\) vs model \(32,\)"),
    (lambda s: s.update({"video_tower.weight": torch.zeros(2)}), r"unclaimed \(1\):\s+video_tower.weight"),
    (lambda s: s.pop("vision_tower.encoder.layers.1.mlp.fc2.weight"),
     r"\(vision_tower\)[\s\S]*missing \(1\):\s+blocks.1.mlp.fc2.weight \(32, 37\)"),
    (lambda s: s.update({"model.multi_modal_projector.linear_1.weight": torch.zeros(2)}), "holds both"),
])
def test_mismatched_weights_are_refused_naming_the_tensor(onevision, tmp_path, change, message):
    folder = onevision[0]
    shutil.copy(folder / "config.json", tmp_path)
    state = dict(read_checkpoint(folder))
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message) as error:
        from_pretrained(tmp_path, mode="hd")
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("key, value, message", [
    ("vision_feature_layer", [-2, -1], "vision_feature_layer \\[-2, -1\\]: flexvlm reads one layer"),
    ("vision_feature_select_strategy", "default", "vision_feature_select_strategy 'default'"),
    ("projector_hidden_act", "relu", "projector_hidden_act 'relu'"),
    ("vision_aspect_ratio", "anyres", "vision_aspect_ratio 'anyres'"),
    ("image_grid_pinpoints", [[30, 45]], r"image_grid_pinpoints \[\[30, 45\]\]: not multiples of the view size"),
    ("vision_config", {"model_type": "clip_vision_model"}, "vision_config model_type 'clip_vision_model'"),
])
def test_unsupported_config_values_are_refused(onevision, tmp_path, key, value, message):
    data = json.loads((onevision[0] / "config.json").read_text())
    data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        arguments(tmp_path)


def test_other_refusals(onevision, tmp_path):
    folder, _, settings, _ = onevision
    with pytest.raises(ValueError, match="holds its vision tower"):
        arguments(folder, vision="/some/clip")
    # a processor that counts other tokens than the model packs
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "config.json").read_text())
    data["vision_aspect_ratio"] = "anyres_max_3"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vision_aspect_ratio 'anyres_max_3' != 'anyres_max_2'"):
        arguments(tmp_path)
    # the folder's weights into a model of other settings
    model = from_pretrained(folder, mode="lr_only")
    (tmp_path / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="vision_aspect_ratio anyres_max_3 vs model anyres_max_2"):
        OneVisionWeights(str(tmp_path)).apply(model)
    # a batch preprocessed with other settings
    batch = _batch(onevision, sizes=SIZES[:1])
    other = image_layout(SIZES[0], OneVisionProcessing(**{**vars(settings), "max_views": 1}))
    stale = OneVisionBatch(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes, [other])
    with pytest.raises(ValueError, match="preprocessed with other settings"):
        model(_ids(onevision, stale), stale.attention_mask, stale)
    assert _ids(onevision, batch).eq(IMAGE_TOKEN_INDEX).sum() == batch.layouts[0].num_tokens


def test_meta_device_build(onevision):
    """Built on the meta device, then materialised: the same model as a plain build."""
    folder = onevision[0]
    with torch.device("meta"):
        meta = from_pretrained(folder, mode="flex")
    assert meta.is_meta
    meta.materialize("cpu")
    plain = from_pretrained(folder, mode="flex").state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in meta.state_dict().items())
