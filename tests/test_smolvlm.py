"""SmolVLM / Idefics3 as a FlexVLM architecture (flexvlm.architectures.smolvlm) against transformers'
SmolVLMForConditionalGeneration and Idefics3ForConditionalGeneration, on tiny random folders that
save_pretrained wrote beside a processor built offline (as tests/test_smolvlm_preprocess.py builds them):
hd and lr_only give transformers' logits, with and without a KV cache, and its greedy tokens; flex and xattn
run, train and generate, and agree where they must; the geometry, by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from flexvlm.architectures import ARCHITECTURES, PretrainedFlexVLM, architecture_of, from_pretrained
from flexvlm.architectures.smolvlm import (
    Connector, TiledEncoder, arguments, flexvlm_input_ids, image_token_id, pixel_shuffle, stitch_tiles,
)
from flexvlm.architectures.smolvlm.preprocess import (
    ImageBatch, ImageLayout, SmolVLMProcessing, collate, prompt_ids, split_image,
)
from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.models.decoder import KVCache
from flexvlm.models.flex_attention import FlexAttention
from flexvlm.models.vision import VisionBackbone
from flexvlm.selection import AllSelection, AttentionSelection

transformers = pytest.importorskip("transformers")
from test_smolvlm_preprocess import _tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor, SmolVLMConfig,
    SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector  # noqa: E402
from transformers.models.smolvlm import processing_smolvlm  # noqa: E402

TILE, PATCH, SCALE = 32, 4, 2  # an 8 x 8 patch grid per view, shuffled to t x t = 4 x 4 tokens
T = TILE // PATCH // SCALE
LONGEST_EDGE = 96  # up to 3 x 3 tiles
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=TILE,
              patch_size=PATCH)
TEXT = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=448, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                         "rope_theta": 5000.0})
FAMILIES = {"smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
            "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration)}
PROMPT = "User:<image>What is in the picture?<end_of_utterance>\nAssistant:"
ANSWER = " A cat."

_rng = np.random.default_rng(0)


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(_rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# (width, height) at longest edge 96, tile 32 -> rows x cols tiles (test_smolvlm_preprocess's arithmetic):
# 200 x 100: 96 x 48, rounded up to 96 x 64 -> 2 x 3; 300 x 60: 96 x 20 -> 96 x 32 -> 1 x 3;
# 100 x 200 -> 3 x 2; and a 40 x 30 image at longest edge 32 (one tile): not split, its global view alone
IMAGES = [(_noise(200, 100), (2, 3)), (_noise(300, 60), (1, 3)), (_noise(40, 30), (0, 0)), (_noise(100, 200), (3, 2))]


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """O(1) activations instead of transformers' 0.02-std init, every norm and bias perturbed, so that a
    wrong or missing tensor shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            else:
                p.copy_(("norm" in name and name.endswith("weight")) + 0.1 * torch.randn_like(p))
    return model.eval()


class Folder:
    """A model folder (model, processor and tokenizer saved by transformers) and what the tests read of it."""

    def __init__(self, family: str, path, tie: bool = False) -> None:
        tokenizer = _tokenizer(family, "<global-img>")
        sizes = dict(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE})
        with pytest.MonkeyPatch.context() as patch:  # SmolVLMProcessor wants num2words for video prompts only
            patch.setattr(processing_smolvlm, "num2words", str)
            if family == "smolvlm":
                SmolVLMProcessor(SmolVLMImageProcessor(**sizes), tokenizer, SmolVLMVideoProcessor(),
                                 image_seq_len=T * T).save_pretrained(path)
            else:
                Idefics3Processor(Idefics3ImageProcessor(**sizes), tokenizer, image_seq_len=T * T).save_pretrained(path)
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert len(tokenizer) <= TEXT["vocab_size"]
        config_class, model_class = FAMILIES[family]
        config = config_class(vision_config=VISION, text_config=TEXT, scale_factor=SCALE, image_token_id=self.image_id,
                              tie_word_embeddings=tie)
        torch.manual_seed(0)
        self.reference = _randomise(model_class(config))
        self.reference.save_pretrained(path)
        self.path, self.family = path, family
        self.processing = SmolVLMProcessing.from_folder(path)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    def batch(self, images=IMAGES) -> ImageBatch:
        """The images' views, each split at the processor's settings, the unsplit one at one tile."""
        unsplit = replace(self.processing, longest_edge=TILE)
        return collate([[split_image(im, self.processing if rc != (0, 0) else unsplit)] for im, rc in images])

    def ids(self, batch: ImageBatch, global_only: bool, answer: bool = False, side: str = "right"):
        """(input_ids with the processor's image id, attention mask, labels or None), padded on ``side``."""
        rows, answers = [], []
        for layouts in batch.layouts:
            prompt = prompt_ids(PROMPT, layouts, self.processing, self.tokenizer, global_only)
            tail = self.tokenizer.encode(ANSWER, add_special_tokens=False).ids if answer else []
            rows.append(prompt + tail)
            answers.append(len(tail))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.eos)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (row, n) in enumerate(zip(rows, answers)):
            start = 0 if side == "right" else width - len(row)
            ids[i, start:start + len(row)] = torch.tensor(row)
            mask[i, start:start + len(row)] = 1
            if n:
                labels[i, start + len(row) - n:start + len(row)] = torch.tensor(row[-n:])
        return ids, mask, labels if answer else None

    def model(self, **overrides):
        torch.manual_seed(0)
        return from_pretrained(self.path, **overrides).eval()


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    return Folder("smolvlm", tmp_path_factory.mktemp("smolvlm"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    if request.param == "smolvlm":
        return request.getfixturevalue("smolvlm")
    return Folder(request.param, tmp_path_factory.mktemp(request.param))


def _hf_logits(folder: Folder, ids, mask, batch: ImageBatch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return folder.reference(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values,
                                pixel_attention_mask=batch.pixel_attention_mask, **kwargs).logits


def _global_views(batch: ImageBatch) -> ImageBatch:
    """Each sample's global view alone, as transformers takes an image that is its own only view."""
    index = torch.tensor([layouts[0].global_view for layouts in batch.layouts])
    rows = torch.arange(len(index))
    return ImageBatch(batch.pixel_values[rows, index][:, None], batch.pixel_attention_mask[rows, index][:, None],
                      batch.layouts)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- exact against transformers ------------------------------------------------------------------------------

def test_the_batch_is_what_the_tests_say(folder):
    """The premise of the tests below: several tile counts and aspect ratios, one image not split, padding views."""
    batch = folder.batch()
    assert [(l[0].rows, l[0].cols) for l in batch.layouts] == [rc for _, rc in IMAGES]
    assert batch.pixel_values.shape == (4, 7, 3, TILE, TILE)
    assert not batch.pixel_values[2, 1:].any() and batch.pixel_values[2, 0].any()  # padding views are zero


def test_hd_gives_transformers_logits(folder):
    """Every view's tokens in the sequence, the full prompt, right padding: transformers' logits."""
    batch = folder.batch()
    ids, mask, _ = folder.ids(batch, global_only=False)
    model = folder.model(mode="hd")
    assert model.mode == "hd" and not model.flex_layers
    expected = _hf_logits(folder, ids, mask, batch)
    with torch.no_grad():
        logits = model(flexvlm_input_ids(ids, folder.image_id), mask, batch).logits
    real = mask.bool()
    diff = _max_diff(logits[real], expected[real])
    print(f"hd {folder.family}: max abs logit difference {diff:.2e}")
    assert diff < 1e-4
    assert float(expected[real].std()) > 0.5  # O(1) logits: the bound means something


def test_lr_only_gives_transformers_logits_of_the_global_view(folder):
    """The global view's tokens alone, its prompt alone: transformers given only the global views' pixels."""
    batch = folder.batch()
    ids, mask, _ = folder.ids(batch, global_only=True)
    expected = _hf_logits(folder, ids, mask, _global_views(batch))
    with torch.no_grad():
        logits = folder.model(mode="lr_only")(flexvlm_input_ids(ids, folder.image_id), mask, batch).logits
    real = mask.bool()
    diff = _max_diff(logits[real], expected[real])
    print(f"lr_only {folder.family}: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_hd_with_a_kv_cache_gives_transformers_cached_logits(smolvlm):
    """Left padding, a prefill, then three single-token steps, each against transformers with its cache."""
    folder = smolvlm
    batch = folder.batch()
    ids, mask, _ = folder.ids(batch, global_only=False, side="left")
    model = folder.model(mode="hd")
    inputs = model.prepare(flexvlm_input_ids(ids, folder.image_id), mask, batch)
    cache_ours = KVCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate gives
    with torch.no_grad():
        out = folder.reference(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values,
                               pixel_attention_mask=batch.pixel_attention_mask, position_ids=positions, use_cache=True)
        ours = model.step(inputs.embeds, inputs.attention_mask, cache_ours, None).logits[:, -1]
        diffs = [_max_diff(ours, out.logits[:, -1])]
        cache, step_mask, position = out.cache, mask, positions[:, -1:]
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], 1)
            position = position + 1
            out = folder.reference(input_ids=token, attention_mask=step_mask, position_ids=position, cache=cache,
                                   use_cache=True)
            cache = out.cache
            ours = model.step(model.llm.embed(token), step_mask, cache_ours, None).logits[:, -1]
            diffs.append(_max_diff(ours, out.logits[:, -1]))
    print(f"hd cached: max abs logit difference per step {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) < 1e-4


def test_greedy_generation_gives_transformers_tokens(smolvlm):
    """Left-padded prompts, greedy: FlexVLM.generate in hd equals transformers' generate."""
    folder = smolvlm
    batch = folder.batch()
    ids, mask, _ = folder.ids(batch, global_only=False, side="left")
    with torch.no_grad():
        expected = folder.reference.generate(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values,
                                             pixel_attention_mask=batch.pixel_attention_mask, max_new_tokens=4,
                                             do_sample=False, eos_token_id=folder.eos, pad_token_id=folder.eos)
    expected = [row[: row.index(folder.eos)] if folder.eos in row else row
                for row in expected[:, ids.shape[1]:].tolist()]
    out = folder.model(mode="hd").generate(flexvlm_input_ids(ids, folder.image_id), mask, batch, max_new_tokens=4,
                                           eos_token_id=folder.eos)
    assert out.tokens == expected
    assert len({tuple(row) for row in expected}) > 1  # the samples differ: the images reach the tokens


def test_hd_with_several_images_in_a_sample_gives_transformers_logits(smolvlm):
    """hd and lr_only take any number of images per sample, their views in order, as transformers does;
    xattn and flex refuse them."""
    folder = smolvlm
    split = [split_image(im, folder.processing) for im, _ in (IMAGES[1], IMAGES[0])]  # 1 x 3 and 2 x 3 tiles
    batch = collate([split, split[:1]])
    texts = ["<image>Compare<image>", "<image>Describe"]
    rows = [prompt_ids(text, layouts, folder.processing, folder.tokenizer)
            for text, layouts in zip(texts, batch.layouts)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [folder.eos] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    expected = _hf_logits(folder, ids, mask, batch)
    with torch.no_grad():
        logits = folder.model(mode="hd")(flexvlm_input_ids(ids, folder.image_id), mask, batch).logits
    assert _max_diff(logits[mask.bool()], expected[mask.bool()]) < 1e-4
    # lr_only: each image's global view, each its prompt's global part: transformers given the global views
    rows = [prompt_ids(text, layouts, folder.processing, folder.tokenizer, global_only=True)
            for text, layouts in zip(texts, batch.layouts)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [folder.eos] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    globals_only = torch.zeros(2, 2, 3, TILE, TILE)
    globals_only[0] = batch.pixel_values[0, [split[0].layout.global_view, split[0].layout.num_views + 6]]
    globals_only[1, 0] = batch.pixel_values[1, split[0].layout.global_view]
    real = torch.ones(2, 2, TILE, TILE, dtype=torch.long)
    real[1, 1] = 0  # the second sample's padding view
    expected = _hf_logits(folder, ids, mask, ImageBatch(globals_only, real, []))
    with torch.no_grad():
        logits = folder.model(mode="lr_only")(flexvlm_input_ids(ids, folder.image_id), mask, batch).logits
    assert _max_diff(logits[mask.bool()], expected[mask.bool()]) < 1e-4
    with pytest.raises(ValueError, match="sample 0 holds 2 images; give one image per sample"):
        folder.model(mode="flex")(flexvlm_input_ids(ids, folder.image_id), mask, batch)


# -- flex and xattn ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, selection", [("flex", "attention"), ("flex", "random"), ("flex", "center"),
                                             ("xattn", None)])
def test_flex_and_xattn_train_and_generate(smolvlm, mode, selection):
    """Forward with labels and backward (W_K' / W_V' and the connector get gradients, the frozen tower none),
    greedy generation (cached equal to uncached, for the attention selection and xattn). The unsplit image has
    no high-res tokens: its logits are lr_only's (plain attention); the split ones' are not."""
    folder = smolvlm
    batch = folder.batch()
    ids, mask, labels = folder.ids(batch, global_only=True, answer=True)
    ids = flexvlm_input_ids(ids, folder.image_id)
    kwargs = dict(selection=selection) if mode == "flex" else {}
    model = folder.model(mode=mode, **kwargs)
    assert isinstance(model.llm.layers[-1].self_attn, FlexAttention)
    model.train()
    out = model(ids, mask, batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    hr_grad = model.llm.layers[-1].self_attn.k_hr_proj.weight.grad
    assert hr_grad is not None and hr_grad.abs().sum() > 0
    assert model.projector.modality_projection.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder.tower.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(ids, mask, batch).logits
        plain = folder.model(mode="lr_only")(ids, mask, batch).logits
    assert _max_diff(logits[2], plain[2]) < 1e-5  # the image without tiles
    assert all(_max_diff(logits[i], plain[i]) > 1e-2 for i in (0, 1, 3))
    left, left_mask, _ = folder.ids(batch, global_only=True, side="left")
    left = flexvlm_input_ids(left, folder.image_id)
    generated = model.generate(left, left_mask, batch, max_new_tokens=3)
    assert len(generated.tokens) == 4 and all(len(row) == 3 for row in generated.tokens)
    if mode == "flex":  # the unsplit image has nothing to select
        assert generated.hr_fraction[2] == 0 and (generated.hr_fraction[[0, 1, 3]] > 0).all()
    if selection in ("attention", None):  # selection recomputed at every step, from the cache or without it
        assert model.generate(left, left_mask, batch, max_new_tokens=3, use_cache=False).tokens == generated.tokens


def test_flex_with_all_selection_equals_xattn_at_the_selecting_rows(smolvlm):
    """With only the last layer special (N_SA = L - 1), flex selecting every high-res token and xattn agree at
    flex's selecting rows: their inputs to the last layer are the plain layers' in both. Other rows differ
    (xattn's see the high-res tokens too), and so does a flex with a real selection."""
    folder = smolvlm
    batch = folder.batch()
    ids, mask, labels = folder.ids(batch, global_only=True, answer=True)
    ids = flexvlm_input_ids(ids, folder.image_id)
    last = TEXT["num_hidden_layers"] - 1
    flex = folder.model(mode="flex", num_sa_layers=last, selection=AllSelection())
    xattn = folder.model(mode="xattn", num_sa_layers=last)
    with torch.no_grad():
        a, b = flex(ids, mask, batch, labels=labels), xattn(ids, mask, batch, labels=labels)
        attention = folder.model(mode="flex", num_sa_layers=last, selection=AttentionSelection())(
            ids, mask, batch, labels=labels)
    selecting = torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    assert selecting.sum() == 4 * 3  # the answer's tokens, predicted from the row before each
    diff = _max_diff(a.logits[selecting], b.logits[selecting])
    print(f"flex (all) vs xattn at the selecting rows: max abs logit difference {diff:.1e}")
    assert diff < 1e-5
    split = selecting.clone()
    split[2] = False
    others = mask.bool() & ~selecting
    others[2] = False
    assert _max_diff(a.logits[others], b.logits[others]) > 1e-2
    assert _max_diff(attention.logits[split], b.logits[split]) > 1e-3
    left, left_mask, _ = folder.ids(batch, global_only=True, side="left")
    left = flexvlm_input_ids(left, folder.image_id)
    assert (flex.generate(left, left_mask, batch, max_new_tokens=3).tokens
            == xattn.generate(left, left_mask, batch, max_new_tokens=3).tokens)


@pytest.mark.parametrize("mode", ["flex", "xattn"])
def test_a_batch_without_tiles_has_no_high_res_tokens(smolvlm, mode):
    """Every image its own only view: a 0 x 0 canvas; the model is lr_only's, training and generating."""
    folder = smolvlm
    batch = folder.batch([IMAGES[2], IMAGES[2]])
    ids, mask, labels = folder.ids(batch, global_only=True, answer=True)
    ids = flexvlm_input_ids(ids, folder.image_id)
    model, plain = folder.model(mode=mode), folder.model(mode="lr_only")
    encoded = model.encoder.encode(batch, model.projector, mode)
    assert encoded.high_res.shape == (2, 0, TEXT["hidden_size"]) and encoded.layout.hr_shape == (0, 0)
    model.train()
    out = model(ids, mask, batch, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        assert abs(float(out.loss) - float(plain(ids, mask, batch, labels=labels).loss)) < 1e-5
    model.eval()
    left, left_mask, _ = folder.ids(batch, global_only=True, side="left")
    left = flexvlm_input_ids(left, folder.image_id)
    assert (model.generate(left, left_mask, batch, max_new_tokens=3).tokens
            == plain.generate(left, left_mask, batch, max_new_tokens=3).tokens)


# -- geometry by hand ----------------------------------------------------------------------------------------

class _ViewConstant(VisionBackbone):
    """A tower-free stand-in: each view's features are its first pixel, the same for every patch; it records
    how many views it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.embed_dim = TILE, PATCH, 1
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.seen = 0

    def _patch_tokens(self, images):
        self.seen += images.shape[0]
        return images[:, :1, 0, 0, None].expand(-1, (TILE // PATCH) ** 2, 1)


def _where(features):
    """(V, t * t, s^2) shuffled features -> (V, t * t, 3): each token's view constant, its row and its column in the
    view's grid."""
    rows = torch.arange(T).repeat_interleave(T).float()
    cols = torch.arange(T).repeat(T).float()
    v = features.shape[0]
    return torch.stack([features[:, : T * T, 0], rows.expand(v, -1), cols.expand(v, -1)], -1)


def _hand_batch():
    """A 2 x 3-tile image, a 3 x 2-tile one and an unsplit one; view v of sample b holds the value 100 b + v + 1."""
    layouts = [ImageLayout(2, 3, TILE, (100, 200), (64, 96)), ImageLayout(3, 2, TILE, (200, 100), (96, 64)),
               ImageLayout(0, 0, TILE, (30, 40), (TILE, TILE))]
    pixels = torch.zeros(3, 7, 3, TILE, TILE)
    mask = torch.zeros(3, 7, TILE, TILE, dtype=torch.long)
    for b, layout in enumerate(layouts):
        for v in range(layout.num_views):
            pixels[b, v] = 100 * b + v + 1
            mask[b, v] = 1
    return ImageBatch(pixels, mask, [[layout] for layout in layouts])


def test_geometry_and_stitching_by_hand():
    encoder = TiledEncoder(_ViewConstant(), SCALE)
    assert encoder.lr_shape == (T, T) == (4, 4) and encoder.feature_dim == SCALE**2
    batch = _hand_batch()
    out = encoder.encode(batch, _where, "flex")
    assert encoder.tower.seen == 7 + 7 + 1  # the real views, never the padding ones
    layout = out.layout
    # 2 x 3 tiles of 4 x 4 tokens: an 8 x 12 grid; 3 x 2: 12 x 8; the canvas is the largest of each side
    assert layout.hr_sizes.tolist() == [[8, 12], [12, 8], [0, 0]] and layout.hr_shape == (12, 12)
    assert layout.lr_shape == (4, 4) and layout.lr_valid.all()
    cell = layout.hr_cell
    # sample 0: high-res row r lies in low-res row r // 2 (8 rows over 4), column c in c // 3 (12 over 4)
    assert [int(cell[0, r, c]) for r, c in [(0, 0), (1, 2), (2, 3), (3, 11), (7, 11), (7, 0)]] == [0, 0, 5, 7, 15, 12]
    assert int(cell[0, 8, 0]) == -1 and int(cell[0, 0, 11]) == 3
    # sample 1: row r in r // 3 (12 over 4), column c in c // 2 (8 over 4)
    assert [int(cell[1, r, c]) for r, c in [(11, 7), (5, 2), (3, 1), (0, 8)]] == [15, 5, 4, -1]
    assert (cell[2] == -1).all() and not layout.hr_valid[2].any()
    assert torch.equal(layout.hr_valid, cell >= 0) and int(layout.hr_valid[0].sum()) == 96
    # the global view (the last) in the sequence; the tiles on the canvas: token (a, b) of tile (r, c) at (4r+a, 4c+b)
    assert out.in_sequence[:, :, 0].tolist() == [[7] * 16, [107] * 16, [201] * 16]
    canvas = out.high_res.view(3, 12, 12, 3)
    for b, (rows, cols) in enumerate([(2, 3), (3, 2)]):
        for r in range(rows * T):
            for c in range(cols * T):
                tile = (r // T) * cols + c // T
                assert canvas[b, r, c].tolist() == [100 * b + tile + 1, r % T, c % T], (b, r, c)
        assert not canvas[b, rows * T:].any() and not canvas[b, :, cols * T:].any()
    assert not canvas[2].any()
    # lr_only: the global views alone reach the tower; hd: every view in the prompt's order, padded, counted
    encoder.tower.seen = 0
    lr = encoder.encode(batch, _where, "lr_only")
    assert encoder.tower.seen == 3 and lr.in_sequence[:, :, 0].tolist() == out.in_sequence[:, :, 0].tolist()
    hd = encoder.encode(batch, _where, "hd")
    assert hd.counts.tolist() == [112, 112, 16] and hd.in_sequence.shape[1] == 112
    assert hd.in_sequence[0, :, 0].tolist() == [v + 1 for v in range(7) for _ in range(16)]
    assert hd.in_sequence[2, 16:].abs().sum() == 0


def test_the_even_mapping_is_exact():
    """Each high-res token's part of the image (its tile's box, ImageLayout.view_box, cut in t x t) lies in the
    part its low-res cell shows (the global view: the whole image in t x t cells)."""
    batch = _hand_batch()
    layout = TiledEncoder(_ViewConstant(), SCALE).encode(batch, _where, "xattn").layout
    eps = 1e-9
    for b in range(2):
        image = batch.layouts[b][0]
        for r in range(image.rows * T):
            for c in range(image.cols * T):
                top, left, bottom, right = image.view_box((r // T) * image.cols + c // T)
                height, width = (bottom - top) / T, (right - left) / T
                box = (top + (r % T) * height, left + (c % T) * width, top + (r % T + 1) * height,
                       left + (c % T + 1) * width)
                i, j = divmod(int(layout.hr_cell[b, r, c]), T)
                assert i / T - eps <= box[0] and box[2] <= (i + 1) / T + eps
                assert j / T - eps <= box[1] and box[3] <= (j + 1) / T + eps


def test_the_connector_is_transformers_pixel_shuffle_and_projection():
    x = torch.randn(3, 64, 5)
    assert torch.equal(pixel_shuffle(x, 2), Idefics3Connector.pixel_shuffle(None, x, 2))
    assert torch.equal(pixel_shuffle(x, 4), Idefics3Connector.pixel_shuffle(None, x, 4))
    y = torch.randn(2, 36, 3)
    assert torch.equal(pixel_shuffle(y, 3), Idefics3Connector.pixel_shuffle(None, y, 3))
    connector = Connector(5 * 4, 7)
    assert connector(pixel_shuffle(x, 2)).shape == (3, 16, 7)
    assert [n for n, _ in connector.named_parameters()] == ["modality_projection.proj.weight"]
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 60, 5), 2)
    tiles = torch.arange(6 * 4, dtype=torch.float).view(6, 4, 1)  # 2 x 3 tiles of 2 x 2 tokens
    assert stitch_tiles(tiles, 2, 3)[..., 0].tolist() == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11],
                                                          [12, 13, 16, 17, 20, 21], [14, 15, 18, 19, 22, 23]]


# -- config, weights, refusals -------------------------------------------------------------------------------

def test_the_placeholder_and_the_registry(smolvlm, tmp_path):
    assert image_token_id(smolvlm.path) == smolvlm.image_id
    ids = torch.tensor([[5, smolvlm.image_id, smolvlm.image_id, 6]])
    assert flexvlm_input_ids(ids, smolvlm.image_id).tolist() == [[5, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 6]]
    assert architecture_of(smolvlm.path).name == "smolvlm"
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    names = [a.name for a in ARCHITECTURES]
    assert "smolvlm" in names
    with pytest.raises(ValueError, match="model_type 'bert'.*it builds " + ", ".join(names)):
        architecture_of(tmp_path)


def test_the_arguments_and_what_is_refused(smolvlm, tmp_path):
    folder = smolvlm
    args = arguments(folder.path)
    assert isinstance(args["encoder"], TiledEncoder) and args["encoder"].tower.frozen
    assert args["llm"].config.rope_theta == 5000.0 and args["llm"].config.rms_norm_eps == 1e-5
    model = folder.model()
    assert model.mode == "flex" and model.num_sa_layers == 1  # FlexVLM's defaults
    assert PretrainedFlexVLM(str(folder.path), mode="xattn", num_sa_layers=2).flex_layers == [2]  # as a config names it
    batch = folder.batch(IMAGES[:1])
    with pytest.raises(ValueError, match="content_box must be None"):
        model.encoder.encode(batch, model.projector, "flex", torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(TypeError, match="encodes the SmolVLM preprocessing's ImageBatch"):
        model.encoder.encode(batch.pixel_values[:, 0], model.projector, "flex")
    with pytest.raises(ValueError, match="zoom belong to a backbone's dual path"):
        from_pretrained(folder.path, zoom=2)
    with pytest.raises(ValueError, match="holds its vision tower"):
        arguments(folder.path, vision="/some/clip")
    # a folder that lacks a tensor: named, with the folder
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(folder.path / "model.safetensors")
    del state["model.connector.modality_projection.proj.weight"]
    save_file(state, broken / "model.safetensors")
    (broken / "config.json").write_text((folder.path / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"(?s){broken}.*missing.*modality_projection.proj.weight"):
        from_pretrained(broken)
    # a processor saved beside the model that cuts other tokens than the connector makes
    processor = (folder.path / "processor_config.json").read_text().replace('"image_seq_len": 16', '"image_seq_len": 9')
    (broken / "processor_config.json").write_text(processor)
    with pytest.raises(ValueError, match="image_seq_len 9: the connector makes 4"):
        arguments(broken)


def test_tied_embeddings_and_the_bare_model_layout(tmp_path):
    """transformers ties lm_head to the embeddings by the top-level tie_word_embeddings (and then saves no
    lm_head.weight); FlexVLM's decoder follows it. A folder of the bare SmolVLMModel (no `model.` prefix, no
    lm_head) loads too. Both give transformers' logits."""
    folder = Folder("smolvlm", tmp_path / "tied", tie=True)
    assert folder.reference.lm_head.weight is folder.reference.model.text_model.embed_tokens.weight
    batch = folder.batch(IMAGES[2:3])
    ids, mask, _ = folder.ids(batch, global_only=True)
    expected = _hf_logits(folder, ids, mask, batch)
    folder.reference.model.save_pretrained(tmp_path / "bare")
    for path in (folder.path, tmp_path / "bare"):
        model = from_pretrained(path, mode="lr_only").eval()
        assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
        with torch.no_grad():
            logits = model(flexvlm_input_ids(ids, folder.image_id), mask, batch).logits
        assert _max_diff(logits, expected) < 1e-4
