"""Qwen2-VL / Qwen2.5-VL as a FlexVLM architecture (flexvlm.architectures.qwen2_vl) against transformers'
Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration, on tiny random folders that save_pretrained
wrote beside a processor built offline: in hd (the native resolution) and lr_only (the reduced one, max_pixels //
zoom^2) the logits are transformers' run on the same images through its own processor at that budget, with and
without a KV cache, in a padded batch of images of several sizes and aspect ratios (two in one sample), and
greedy generation gives its tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flexvlm.architectures import architecture_of, from_pretrained
from flexvlm.architectures.qwen2_vl import (
    QwenEncoder, QwenVLProcessing, batch_samples, flexvlm_input_ids, image_positions, image_token_id,
    reduced_processing,
)
from flexvlm.architectures.qwen2_vl.positions import high_res_positions
from flexvlm.models.decoder import KVCache
from flexvlm.models.geometry import VisualLayout, uniform_cells
from flexvlm.models.qwen2 import Qwen2
from flexvlm.selection import AllSelection

transformers = pytest.importorskip("transformers")
from test_qwen2_vl_preprocess import IMAGE, PROMPT, _tokenizer  # noqa: E402
from test_smolvlm import _randomise  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLConfig,
    Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
)

ZOOM = 2
MIN_PIXELS, MAX_PIXELS = 784 * 2, 784 * 24  # 28 * 28 px a merged token: 2 to 24 tokens an image at native size
REDUCED_MAX_PIXELS = MAX_PIXELS // ZOOM**2  # the rule under test, spelled out: 6 tokens at most
# 2 layers; head_dim 16: 8 rotary frequencies, 2 temporal, 3 height, 3 width
TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 320, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3]}}
FAMILIES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                 {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2}),
    # windows of 56 px: 2 x 2 merge blocks, full attention in block 1
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                   {"depth": 2, "hidden_size": 32, "intermediate_size": 40, "out_hidden_size": 32, "num_heads": 4,
                    "window_size": 56, "fullatt_block_indexes": [1]}),
}

_rng = np.random.default_rng(0)


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(_rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# a wide image, a tall one next to a small square one (upscaled to min_pixels), an image over the native budget
SAMPLES = [[_noise(300, 100)], [_noise(60, 200), _noise(40, 40)], [_noise(500, 450)]]
TEXTS = [PROMPT, f"<|im_start|>user\nCompare {IMAGE} with\n{IMAGE}.<|im_end|>\n<|im_start|>assistant\n", PROMPT]


class Folder:
    """A tiny random model saved with its processor, transformers' model and a processor at each resolution."""

    def __init__(self, family: str, path, tie: bool = False) -> None:
        config_class, model_class, processor_class, vision = FAMILIES[family]
        tokenizer = _tokenizer()
        assert len(tokenizer) <= TEXT["vocab_size"]
        ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
               for name in ("image_pad", "video_pad", "vision_start", "vision_end", "im_end", "endoftext")}
        self.processors = {
            mode: processor_class(Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=budget), tokenizer,
                                  Qwen2VLVideoProcessor())
            for mode, budget in (("hd", MAX_PIXELS), ("lr_only", REDUCED_MAX_PIXELS))}
        self.processors["hd"].save_pretrained(path)
        config = config_class(vision_config=vision, text_config=TEXT, image_token_id=ids["image_pad"],
                              video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                              vision_end_token_id=ids["vision_end"], tie_word_embeddings=tie)
        torch.manual_seed(0)
        self.reference = _randomise(model_class(config))
        self.reference.save_pretrained(path)
        self.path, self.family, self.image_id = path, family, ids["image_pad"]
        self.eos, self.pad = ids["im_end"], ids["endoftext"]

    def inputs(self, mode: str, side: str = "right", samples=SAMPLES, texts=TEXTS) -> dict:
        """transformers' processor's batch at the mode's resolution (xattn and flex: lr_only's), padded on ``side``."""
        processor = self.processors["hd" if mode == "hd" else "lr_only"]
        processor.tokenizer.padding_side = side
        return processor(images=[im for sample in samples for im in sample], text=texts, padding=True,
                         return_tensors="pt")

    def model(self, mode: str, **overrides):
        torch.manual_seed(0)
        return from_pretrained(self.path, mode=mode, zoom=ZOOM, **overrides).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    return Folder(request.param, tmp_path_factory.mktemp(request.param))


def _ours(folder: Folder, mode: str, inputs: dict, samples=SAMPLES):
    """(FlexVLM's input ids, the images as flexvlm preprocesses them), checked equal to the processor's."""
    images = batch_samples(samples, QwenVLProcessing.from_folder(folder.path), ZOOM)
    packed = images.at(mode)
    torch.testing.assert_close(packed.pixel_values, inputs["pixel_values"], rtol=0, atol=0)
    assert packed.grid_thw.tolist() == inputs["image_grid_thw"].tolist()
    return flexvlm_input_ids(inputs["input_ids"], folder.image_id), images


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_the_batch_is_what_the_tests_say(folder):
    """The premise: several sizes and aspect ratios at each resolution, the reduced ones smaller, one image as
    large at both (under the reduced budget), padding in the batch."""
    native, reduced = folder.inputs("hd")["image_grid_thw"], folder.inputs("lr_only")["image_grid_thw"]
    assert len({tuple(g) for g in native.tolist()}) == 4 and len({tuple(g) for g in reduced.tolist()}) >= 3
    pixels = lambda grids: grids.prod(-1)  # noqa: E731
    assert (pixels(reduced) <= pixels(native)).all() and (pixels(reduced) < pixels(native)).sum() == 3
    assert (pixels(reduced) * 196 <= REDUCED_MAX_PIXELS).all()
    assert not folder.inputs("hd")["attention_mask"].all()


@pytest.mark.parametrize("mode", ["hd", "lr_only"])
def test_logits_equal_transformers(folder, mode):
    """Right padding, a whole forward: transformers' logits at the mode's resolution."""
    inputs = folder.inputs(mode)
    ids, images = _ours(folder, mode, inputs)
    with torch.no_grad():
        expected = folder.reference(**inputs).logits
        logits = folder.model(mode)(ids, inputs["attention_mask"], images).logits
    real = inputs["attention_mask"].bool()
    diff = _max_diff(logits[real], expected[real])
    print(f"{mode} {folder.family}: max abs logit difference {diff:.2e}")
    assert diff < 1e-4
    assert float(expected[real].std()) > 0.5  # O(1) logits: the bound means something


@pytest.mark.parametrize("mode", ["hd", "lr_only"])
def test_cached_logits_equal_transformers(folder, mode):
    """Left padding, a prefill, then three single-token steps, each against transformers with its cache; a step's
    position is what transformers' generate gives it: its index among the real tokens plus the rope delta."""
    inputs = folder.inputs(mode, side="left")
    ids, images = _ours(folder, mode, inputs)
    model = folder.model(mode)
    mask, diffs = inputs["attention_mask"], []
    with torch.no_grad():
        out = folder.reference(**inputs, use_cache=True)
        deltas = folder.reference.model.rope_deltas
        prepared = model.prepare(ids, mask, images)
        cache = KVCache()
        ours = model.step(prepared.embeds, mask, cache, None, positions=prepared.positions).logits[:, -1]
        diffs.append(_max_diff(ours, out.logits[:, -1]))
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat((mask, mask.new_ones(len(mask), 1)), dim=1)
            position = ((mask.cumsum(-1) - 1)[:, -1:] + deltas).expand(3, -1, -1)
            out = folder.reference(input_ids=token, attention_mask=mask, position_ids=position, cache=out.cache,
                                   use_cache=True)
            ours = model.step(model.llm.embed(token), mask, cache, None, positions=prepared.positions).logits[:, -1]
            diffs.append(_max_diff(ours, out.logits[:, -1]))
    print(f"{mode} {folder.family} cached: max abs logit difference per step {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) < 1e-4
    assert (deltas != 0).any()  # the images shift the text after them: the deltas are tested


@pytest.mark.parametrize("mode", ["hd", "lr_only"])
def test_greedy_generation_gives_transformers_tokens(folder, mode):
    """Left-padded prompts, greedy, cached and not: FlexVLM.generate equals transformers' generate."""
    inputs = folder.inputs(mode, side="left")
    ids, images = _ours(folder, mode, inputs)
    with torch.no_grad():
        expected = folder.reference.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=folder.eos,
                                             pad_token_id=folder.pad)[:, ids.shape[1]:].tolist()
    expected = [row[: row.index(folder.eos)] if folder.eos in row else row for row in expected]
    model = folder.model(mode)
    for use_cache in (True, False):
        out = model.generate(ids, inputs["attention_mask"], images, max_new_tokens=5, eos_token_id=folder.eos,
                             use_cache=use_cache)
        assert out.tokens == expected


def test_the_registry_and_the_arguments(folder, tmp_path):
    assert architecture_of(folder.path).name == "qwen2-vl"
    assert image_token_id(folder.path) == folder.image_id
    model = folder.model("lr_only")
    assert isinstance(model.encoder, QwenEncoder) and isinstance(model.llm, Qwen2)
    assert model.llm.config.mrope_section == (2, 3, 3) and model.mode == "lr_only"
    assert model.encoder.reduced == reduced_processing(model.encoder.processing, ZOOM)
    assert model.encoder.reduced.max_pixels == REDUCED_MAX_PIXELS
    assert from_pretrained(folder.path).mode == "hd"  # the original model by default
    with pytest.raises(ValueError, match="holds its vision tower"):
        from_pretrained(folder.path, vision="clip")
    with pytest.raises(ValueError, match="zoom must be an int >= 1"):
        from_pretrained(folder.path, zoom=0)


def test_tied_embeddings_and_the_in_memory_layout(tmp_path):
    """Tied embeddings (no lm_head saved), and a state dict in transformers' module tree (model.language_model.*,
    model.visual.*), both load and give transformers' logits."""
    folder = Folder("qwen2-vl", tmp_path / "tied", tie=True)
    from safetensors.torch import load_file, save_file

    saved = load_file(str(folder.path / "model.safetensors"))
    assert "lm_head.weight" not in saved and any(k.startswith("visual.") for k in saved)
    inputs = folder.inputs("hd")
    ids, images = _ours(folder, "hd", inputs)
    with torch.no_grad():
        expected = folder.reference(**inputs).logits
    real = inputs["attention_mask"].bool()
    in_memory = {k: v.contiguous() for k, v in folder.reference.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in in_memory)
    for state in (None, in_memory):
        if state is not None:
            save_file(state, str(folder.path / "model.safetensors"))
        with torch.no_grad():
            logits = folder.model("hd")(ids, inputs["attention_mask"], images).logits
        assert _max_diff(logits[real], expected[real]) < 1e-4


# -- xattn and flex ------------------------------------------------------------------------------------------

# one image a sample, the same reduced grid (56 x 84 px: 2 x 3 tokens), native grids of 4 x 5, 4 x 6 and 2 x 3 tokens
# (the last as large as its reduced one)
HIGH_RES_SAMPLES = [[_noise(150, 100)], [_noise(168, 112)], [_noise(90, 60)]]
ANSWER = " A cat."


def _with_answers(folder: Folder, mode: str, side: str = "right"):
    """(FlexVLM's ids, mask, labels: the answer's tokens, images) of the high-res samples."""
    prompts = folder.inputs(mode, side, HIGH_RES_SAMPLES, [PROMPT] * 3)
    inputs = folder.inputs(mode, side, HIGH_RES_SAMPLES, [PROMPT + ANSWER] * 3)
    ids, images = _ours(folder, mode, inputs, HIGH_RES_SAMPLES)
    labels = torch.full_like(ids, -100)
    for b in range(len(ids)):
        real = inputs["attention_mask"][b].nonzero().flatten()
        answer = real[int(prompts["attention_mask"][b].sum()):]
        labels[b, answer] = inputs["input_ids"][b, answer]
    return ids, inputs["attention_mask"], labels, images


def test_high_res_positions_by_a_naive_loop():
    """Each high-res key at its low-res cell's (t, h, w) positions, the row and column scaled to the high-res grid:
    (t, r0 + i h / H_b, c0 + j w / W_b) from the image's first row and column r0, c0; 0 off a sample's grid."""
    lr_shape, sizes = (2, 3), torch.tensor([[4, 5], [3, 7], [2, 3]])
    canvas = (4, 7)
    cells = uniform_cells(sizes, canvas, lr_shape)
    layout = VisualLayout(lr_shape, sizes, cells, torch.ones(3, *lr_shape, dtype=torch.bool), cells >= 0)
    starts = [5, 9, 2]  # each sample's image starts at position s: its token (a, c) is at (s, s + a, s + c)
    lr_positions = torch.stack([image_positions((1, 4, 6), 2, s) for s in starts], dim=1)  # (3, B, 6)
    got = high_res_positions(lr_positions, layout)
    expected = torch.zeros(3, 3, canvas[0] * canvas[1])
    for b, (height, width) in enumerate(sizes.tolist()):
        for i in range(height):
            for j in range(width):
                a, c = i * lr_shape[0] // height, j * lr_shape[1] // width  # the cell the token falls in
                t, r, q = lr_positions[:, b, a * lr_shape[1] + c].tolist()
                expected[:, b, i * canvas[1] + j] = torch.tensor(
                    [t, r + i * lr_shape[0] / height - a, q + j * lr_shape[1] / width - c])
                assert (int(expected[1, b, i * canvas[1] + j]) - starts[b], int(expected[2, b, i * canvas[1] + j])
                        - starts[b]) == (a, c)  # the integer part is the cell's
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 2].view(3, *canvas)[:, :2, :3].flatten(1), lr_positions[:, 2].float())


@pytest.mark.parametrize("mode, selection", [("flex", "attention"), ("xattn", None)])
def test_flex_and_xattn_train_and_generate(folder, mode, selection):
    """The reduced image in the sequence, the native one's tokens as high-res keys: a forward with labels and
    backward (W_K' / W_V' and the merger get gradients, the frozen blocks none), greedy generation cached equal to
    uncached; the logits differ from lr_only's (the high-res keys are seen)."""
    ids, mask, labels, images = _with_answers(folder, mode)
    kwargs = dict(selection=selection) if mode == "flex" else {}
    model = folder.model(mode, **kwargs)
    model.train()
    out = model(ids, mask, images, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.llm.layers[-1].self_attn.k_hr_proj.weight.grad.abs().sum() > 0
    assert model.encoder.tower.merger.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.tower.blocks.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(ids, mask, images).logits
        plain = folder.model("lr_only")(ids, mask, images).logits
    assert _max_diff(logits[mask.bool()], plain[mask.bool()]) > 1e-2
    prompt = folder.inputs(mode, "left", HIGH_RES_SAMPLES, [PROMPT] * 3)
    left, _ = _ours(folder, mode, prompt, HIGH_RES_SAMPLES)
    generated = model.generate(left, prompt["attention_mask"], images, max_new_tokens=3)
    assert all(len(row) == 3 for row in generated.tokens)
    if mode == "flex":
        assert (generated.hr_fraction > 0).all()
    assert model.generate(left, prompt["attention_mask"], images, max_new_tokens=3,
                          use_cache=False).tokens == generated.tokens


def test_flex_with_all_selection_equals_xattn_at_the_selecting_rows(folder):
    """With only the last layer special, flex selecting every high-res token and xattn agree at flex's selecting
    rows (their inputs to the last layer are the plain layers' in both), and so do their greedy tokens."""
    ids, mask, labels, images = _with_answers(folder, "flex")
    last = TEXT["num_hidden_layers"] - 1
    flex = folder.model("flex", num_sa_layers=last, selection=AllSelection())
    xattn = folder.model("xattn", num_sa_layers=last)
    with torch.no_grad():
        a, b = flex(ids, mask, images, labels=labels), xattn(ids, mask, images, labels=labels)
    selecting = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    assert selecting.sum() > 0
    assert _max_diff(a.logits[selecting], b.logits[selecting]) < 1e-5
    prompt = folder.inputs("flex", "left", HIGH_RES_SAMPLES, [PROMPT] * 3)
    left, _ = _ours(folder, "flex", prompt, HIGH_RES_SAMPLES)
    assert (flex.generate(left, prompt["attention_mask"], images, max_new_tokens=3).tokens
            == xattn.generate(left, prompt["attention_mask"], images, max_new_tokens=3).tokens)


def test_the_high_res_layout_and_what_is_refused(folder):
    """The layout of the native grids on the low-res one; several images in a sample, or reduced grids that
    differ, are refused in xattn / flex."""
    ids, mask, _, images = _with_answers(folder, "xattn")
    model = folder.model("xattn")
    encoded = model.encoder.encode(images, model.projector, "xattn")
    assert encoded.layout.lr_shape == (2, 3) and encoded.layout.hr_sizes.tolist() == [[4, 5], [4, 6], [2, 3]]
    assert encoded.high_res.shape[:2] == (3, 4 * 6) and encoded.in_sequence.shape[:2] == (3, 6)
    with torch.no_grad():  # the native tokens are the tower's on the native image, row-major on the canvas
        native = model.encoder.tower(images.native.pixel_values, images.native.grid_thw)
    torch.testing.assert_close(encoded.high_res.view(3, 4, 6, -1)[0, :4, :5].flatten(0, 1), native[:20])
    # the keys' positions from the prompt's: each image's first key at its first token's, and the native grid as
    # large as the reduced one (sample 2) at its tokens' own
    prepared = model.prepare(ids, mask, images)
    lr_index = prepared.image_start[:, None] + torch.arange(6)
    keys = model.encoder.high_res_positions(prepared.positions.prompt, lr_index, encoded.layout)
    first = prepared.positions.prompt.gather(2, prepared.image_start.view(1, 3, 1).expand(3, -1, -1)).float()
    torch.testing.assert_close(keys[:, :, :1], first, rtol=0, atol=0)
    image_tokens = prepared.positions.prompt[:, 2, lr_index[2]].float()
    torch.testing.assert_close(keys[:, 2].view(3, 4, 6)[:, :2, :3].flatten(1), image_tokens, rtol=0, atol=0)
    inputs = folder.inputs("flex")
    ids, several = _ours(folder, "lr_only", inputs)
    with pytest.raises(ValueError, match="images per sample"):
        folder.model("flex")(ids, inputs["attention_mask"], several)
    one_each = [[sample[0]] for sample in SAMPLES]
    with pytest.raises(ValueError, match="reduced grids"):
        model.encoder.encode(batch_samples(one_each, model.encoder.processing, ZOOM), model.projector, "xattn")
