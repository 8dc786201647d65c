"""LLaVA-OneVision preprocessing (flexvlm/architectures/llava_onevision/preprocess.py) against
transformers' LlavaOnevisionImageProcessor (torchvision), LlavaOnevisionProcessor and the model's
pack_image_features, on small processors saved offline: 56 px (g = 4) and 28 px (g = 2) views,
and 60 px (g = 4, the views' last 4 pixels feeding no token, as 384 px views with patch 14 leave 6),
patch 14, pinpoints of 1 .. 3 views a side, anyres_max budgets small enough that some grids are shrunk."""

import json
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (  # noqa: E402
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

from flexvlm.architectures.llava_onevision.preprocess import (  # noqa: E402
    OneVisionProcessing,
    base_cell_of_grid_tokens,
    batch_inputs,
    expand_image_tokens,
    grid_token_centres,
    image_layout,
    preprocess_image,
)
from flexvlm.data.tokenizer import HFTokenizer  # noqa: E402

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def pinpoints(tile):  # (height, width), in views: 1 x 1, 1 x 2, 2 x 1, 2 x 2, 3 x 1
    return [[tile * rows, tile * cols] for rows, cols in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]]


# name: (tile size, anyres_max_N, mean, std); patch 14 in both
SETUPS = {"s56": (56, 2, CLIP_MEAN, CLIP_STD), "s60": (60, 3, [0.5] * 3, [0.5] * 3)}
# (height, width): 2:1 wide (the hand-computed 200 x 100), 3:1 wide, 1:2 tall, 1:1, 1:3 tall, then seeded odd ones
SIZES = [(100, 200), (80, 240), (200, 100), (120, 120), (180, 60)]
SIZES += [(147, 392), (188, 47)]  # the image's extent in tokens is x.9999999: rounded to 7 decimals, the cut differs
SIZES += [(random.Random(i).randint(20, 300), random.Random(i + 99).randint(20, 300)) for i in range(6)]
CORPUS = ["What is in the image? Describe it in detail.", "There are two cats on a red sofa.\nAnswer briefly."]


def noise_image(size, seed=0) -> Image.Image:
    height, width = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def model_config(tile, budget, image_token_id, vocab_size) -> LlavaOnevisionConfig:
    """A tiny SigLIP + Qwen2 LLaVA-OneVision with the setup's geometry."""
    return LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "image_size": tile, "patch_size": 14,
                       "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "vision_use_head": False},
        text_config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab_size},
        image_grid_pinpoints=pinpoints(tile), vision_aspect_ratio=f"anyres_max_{budget}",
        image_token_index=image_token_id, video_token_index=image_token_id + 1,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (folder, transformers' processor loaded back from it, its model config)."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # Qwen2-like: no prefix space
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = {}
    for name, (tile, budget, mean, std) in SETUPS.items():
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
        images = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile},
                                              image_grid_pinpoints=pinpoints(tile), image_mean=mean, image_std=std)
        processor = LlavaOnevisionProcessor(
            image_processor=images, tokenizer=fast, video_processor=LlavaOnevisionVideoProcessor(),
            num_image_tokens=(tile // 14) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio=f"anyres_max_{budget}")
        folder = tmp_path_factory.mktemp(name)
        processor.save_pretrained(folder)
        config = model_config(tile, budget, fast.convert_tokens_to_ids("<image>"), len(fast))
        config.save_pretrained(folder)
        out[name] = (folder, LlavaOnevisionProcessor.from_pretrained(folder), config)
    return out


# ---------------------------------------------------------------- layouts by hand


def test_hand_computed_layouts(folders):
    settings = OneVisionProcessing.from_folder(folders["s56"][0])  # S 56, patch 14: g = 4; anyres_max_2
    assert (settings.tile_size, settings.patch_size, settings.view_tokens, settings.max_views) == (56, 14, 4, 2)

    # 200 wide x 100 high. Pinpoints (h, w): (56, 112) shows it whole at scale 0.56 (112 x 56 = 6272 pixels)
    # and wastes none; (112, 112) shows as much but wastes 6272; the others show 56 x 28. So 1 x 2 tiles,
    # 4 x 8 grid tokens, no padding (aspect 2 both), 32 tokens = 2 views' worth: ratio 1, no shrink;
    # 16 base + 4 x (8 + 1) = 52 tokens.
    layout = image_layout((100, 200), settings)
    assert layout.best_resolution == (56, 112) and layout.fitted_size == (56, 112) and layout.grid == (1, 2)
    assert (layout.unpadded_grid, layout.unpad_offset, layout.feature_grid) == ((4, 8), (0, 0), (4, 8))
    assert (layout.num_views, layout.num_tokens) == (3, 52)
    # grid token (r, c) has its centre at y = (14 r + 7) 100 / 56, x = (14 c + 7) 200 / 112: base cell
    # i = floor(y 56 / 100 / 14) = r, j = floor(x 56 / 200 / 14) = c // 2
    expected = torch.tensor([[r * 4 + c // 2 for c in range(8)] for r in range(4)])
    assert torch.equal(base_cell_of_grid_tokens(layout), expected)
    # the same under anyres_max_1 (16 tokens): ratio sqrt(32 / 16) = 1.41 > 1.1, shrunk to
    # (4 // 1.41, 8 // 1.41) = 2 x 5; 16 + 2 x 6 = 28
    tight = image_layout((100, 200), OneVisionProcessing(**{**vars(settings), "max_views": 1}))
    assert (tight.unpadded_grid, tight.feature_grid, tight.num_tokens) == ((4, 8), (2, 5), 28)

    # 240 x 80 (3:1): (56, 112) again (shows 112 x 37); the width binds, fitted 38 x 112 (ceil(37.3)),
    # pasted 9 rows down. The 4 x 8 grid is wider than 2:1: the image spans round(80 x 8 / 240) = 2 token
    # rows, (4 - 2) // 2 = 1 row cut at the top and at the bottom: 2 x 8; 16 + 2 x 9 = 34
    layout = image_layout((80, 240), settings)
    assert (layout.best_resolution, layout.fitted_size) == ((56, 112), (38, 112))
    assert (layout.unpadded_grid, layout.unpad_offset, layout.feature_grid) == ((2, 8), (1, 0), (2, 8))
    assert layout.num_tokens == 34

    # 100 x 200 (1:2 tall): (112, 56), 2 x 1 tiles, 8 x 4 tokens, no padding; 16 + 8 x 5 = 56
    layout = image_layout((200, 100), settings)
    assert (layout.best_resolution, layout.grid, layout.feature_grid) == ((112, 56), (2, 1), (8, 4))
    assert layout.num_tokens == 56

    # 120 x 120: (112, 112), 2 x 2 tiles, 8 x 8 = 64 tokens, ratio sqrt(64 / 32) = 1.41: shrunk to 5 x 5; 16 + 30 = 46
    layout = image_layout((120, 120), settings)
    assert (layout.grid, layout.unpadded_grid, layout.feature_grid, layout.num_tokens) == ((2, 2), (8, 8), (5, 5), 46)

    # 60 x 180 (1:3 tall): (168, 56), 3 x 1 tiles, 12 x 4 = 48 tokens, ratio 1.22: (12 // 1.22, 4 // 1.22) = 9 x 3
    layout = image_layout((180, 60), settings)
    assert (layout.grid, layout.feature_grid, layout.num_tokens) == ((3, 1), (9, 3), 16 + 9 * 4)

    # 60 x 180 under s60 (S 60, g 4: a view's tokens see its first 56 pixels; anyres_max_3): (180, 60),
    # 3 x 1 tiles at scale 1, 12 x 4 = 48 tokens = 3 views' worth, no shrink; 16 + 12 x 5 = 76.
    # Token row r's centre: y = 60 (r // 4) + 14 (r % 4) + 7 = 7, 21, 35, 49 | 67, 81, 95, 109 | 127, ...
    # 169; the base view squashes 180 to 60 (y / 3), its cell i sees [14 i, 14 i + 14): i = floor(y / 42),
    # clamped to 3 (y 169 lies in the base view's last 4 pixels, which feed no token). Columns: j = c.
    layout = image_layout((180, 60), OneVisionProcessing.from_folder(folders["s60"][0]))
    assert (layout.grid, layout.feature_grid, layout.num_tokens) == ((3, 1), (12, 4), 76)
    cell_rows = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]  # floor(y / 45), cells over the whole view, gives 2 at r = 8
    expected = torch.tensor([[i * 4 + c for c in range(4)] for i in cell_rows])
    assert torch.equal(base_cell_of_grid_tokens(layout), expected)


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", SETUPS)
def test_pixels_and_token_counts_match_transformers(folders, name):
    folder, processor, config = folders[name]
    settings = OneVisionProcessing.from_folder(folder)
    image_token_id = processor.image_token_id
    shrunk = 0
    for i, size in enumerate(SIZES):
        image = noise_image(size, seed=i)
        theirs = processor.image_processor(image, return_tensors="pt")
        views, layout = preprocess_image(image, settings)
        # exact: the same uint8 resizes and paddings, the same fused float32 normalisation
        torch.testing.assert_close(views, theirs["pixel_values"][0], rtol=0, atol=0)
        assert theirs["image_sizes"].tolist() == [list(size)]
        views_taken = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        assert layout.num_views == views_taken  # what the model takes of pixel_values
        ids = processor(images=image, text="<image>", return_tensors="pt")["input_ids"][0]
        assert (ids == image_token_id).sum().item() == layout.num_tokens
        shrunk += layout.feature_grid != layout.unpadded_grid
    assert 0 < shrunk < len(SIZES)  # both paths taken


@pytest.mark.parametrize("name", SETUPS)
def test_packing_order_and_positions_match_the_model(folders, name):
    """The model's pack_image_features on features that hold their own position: the length, the
    base view first, a newline after each grid row, which canvas tokens survive unpadding, and where
    a shrunk grid samples them."""
    folder, _, config = folders[name]
    settings = OneVisionProcessing.from_folder(folder)
    g, tile, patch = settings.view_tokens, settings.tile_size, settings.patch_size
    newline = torch.tensor([-7.0, -7.0, -7.0])
    within = (torch.arange(g, dtype=torch.float64) + 0.5) * patch  # a view's token centres, in its pixels
    for size in SIZES:
        layout = image_layout(size, settings)
        rows, cols = layout.grid
        features = torch.zeros(layout.num_views, g, g, 3, dtype=torch.float64)  # (y, x on the canvas, is grid)
        for view in range(1, layout.num_views):
            tile_row, tile_col = divmod(view - 1, cols)
            features[view, :, :, 0] = (tile_row * tile + within)[:, None]
            features[view, :, :, 1] = (tile_col * tile + within)[None, :]
            features[view, :, :, 2] = 1
        packed, lengths = LlavaOnevisionModel.pack_image_features(
            SimpleNamespace(config=config), [features.flatten(1, 2)], torch.tensor([size]),
            image_newline=newline.double(), vision_aspect_ratio=config.vision_aspect_ratio)
        packed = packed[0]
        assert lengths.tolist() == [layout.num_tokens]
        assert (packed[: g * g, 2] == 0).all()  # the base view first
        h, w = layout.feature_grid
        grid = packed[g * g:].view(h, w + 1, 3)
        assert (grid[:, w] == newline).all() and (grid[:, :w, 2] == 1).all()  # one newline ending each row
        # our centres, back on the canvas, are where the model's grid tokens came from
        ys, xs = grid_token_centres(layout)
        (canvas_h, canvas_w), (fit_h, fit_w) = layout.best_resolution, layout.fitted_size
        ys = ys * fit_h / size[0] + (canvas_h - fit_h) // 2
        xs = xs * fit_w / size[1] + (canvas_w - fit_w) // 2
        torch.testing.assert_close(grid[:, :w, 0], torch.from_numpy(ys)[:, None].expand(h, w), rtol=0, atol=1e-9)
        torch.testing.assert_close(grid[:, :w, 1], torch.from_numpy(xs)[None, :].expand(h, w), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SETUPS)
def test_grid_token_centres_read_off_the_pixels(folders, name):
    """On an image whose red is its x and green its y, each unshrunk grid token's pixels (transformers')
    average to the original position grid_token_centres gives (linear ramps survive the resize away from
    the image's edges)."""
    folder, processor, _ = folders[name]
    settings = OneVisionProcessing.from_folder(folder)
    tile, patch = settings.tile_size, settings.patch_size
    mean, std = (torch.tensor(v)[:, None, None] for v in SETUPS[name][2:])
    checked = 0
    for size in [(100, 200), (80, 240), (200, 100), (70, 230), (150, 90)]:
        height, width = size
        ramp = np.zeros((height, width, 3), dtype=np.uint8)
        ramp[..., 0], ramp[..., 1] = np.arange(width)[None, :], np.arange(height)[:, None]
        layout = image_layout(size, settings)
        assert layout.feature_grid == layout.unpadded_grid  # a shrunk grid's tokens are no pixels'
        views = processor.image_processor(Image.fromarray(ramp), return_tensors="pt")["pixel_values"][0, 1:]
        rows, cols = layout.grid
        canvas = (views * std + mean).mul(255).view(rows, cols, 3, tile, tile).permute(2, 0, 3, 1, 4)
        canvas = canvas.reshape(3, rows * tile, cols * tile)
        ys, xs = grid_token_centres(layout)
        (canvas_h, canvas_w), (fit_h, fit_w) = layout.best_resolution, layout.fitted_size
        top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
        g, (h, w), (cut_top, cut_left) = layout.view_tokens, layout.feature_grid, layout.unpad_offset
        for r in range(h):
            for c in range(w):
                ty, tx = r + cut_top, c + cut_left
                y0, x0 = ty // g * tile + ty % g * patch, tx // g * tile + tx % g * patch
                # only tokens a patch away from the fitted image's edges, where the resize is linear
                inside = top + patch <= y0 <= top + fit_h - 2 * patch and left + patch <= x0 <= left + fit_w - 2 * patch
                if not inside:
                    continue
                block = canvas[:, y0:y0 + patch, x0:x0 + patch]
                # a pixel's value v spans [v, v + 1): its centre is v + 0.5
                assert abs(block[0].mean().item() + 0.5 - xs[c]) < 0.5, (size, r, c)
                assert abs(block[1].mean().item() + 0.5 - ys[r]) < 0.5, (size, r, c)
                checked += 1
    assert checked > 20


PROMPTS = ["<image>\nWhat is in the image?", "Describe it in detail. <image> There are two cats.",
           "There are two cats on a red sofa.<image>", "<image>"]


@pytest.mark.parametrize("name", SETUPS)
def test_prompt_ids_match_processor(folders, name):
    folder, processor, _ = folders[name]
    settings = OneVisionProcessing.from_folder(folder)
    tokenizer = HFTokenizer(folder)  # flexvlm's own, no transformers
    assert settings.image_token_id == processor.image_token_id
    for i, (prompt, size) in enumerate(zip(PROMPTS, SIZES)):
        image = noise_image(size, seed=i)
        layout = image_layout(size, settings)
        ours = expand_image_tokens(tokenizer.encode(prompt), [layout.num_tokens], settings.image_token_id)
        theirs = processor(images=image, text=prompt)["input_ids"][0]
        assert ours == theirs, prompt


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_matches_processor_and_runs_the_model(folders, padding_side):
    folder, processor, config = folders["s56"]
    settings = OneVisionProcessing.from_folder(folder)
    sizes = [(100, 200), (120, 120), (200, 100)]  # 2:1, 1:1 (shrunk), 1:2: 3, 5, 3 views
    images = [noise_image(size, seed=i) for i, size in enumerate(sizes)]
    prompts = PROMPTS[:3]
    processor.tokenizer.padding_side = padding_side
    theirs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    ours = batch_inputs(images, prompts, HFTokenizer(folder), settings, padding_side=padding_side)
    assert ours.pixel_values.shape == (3, 5, 3, 56, 56)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        torch.testing.assert_close(getattr(ours, key), theirs[key], rtol=0, atol=0, msg=key)
    assert [layout.image_size for layout in ours.layouts] == sizes
    # the model finds as many image tokens as it packs features (it raises otherwise)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        logits = model(input_ids=ours.input_ids, attention_mask=ours.attention_mask,
                       pixel_values=ours.pixel_values, image_sizes=ours.image_sizes).logits
    assert logits.shape[:2] == ours.input_ids.shape and torch.isfinite(logits).all()


# ---------------------------------------------------------------- folders and errors


def test_from_folder_reads_the_hubs_older_layout(folders, tmp_path):
    """The hub's llava-hf folders: preprocessor_config.json beside a flat processor_config.json;
    without config.json the patch comes from num_image_tokens."""
    folder, _, _ = folders["s56"]
    nested = json.loads((folder / "processor_config.json").read_text())
    image = {**nested.pop("image_processor"), "processor_class": "LlavaOnevisionProcessor"}
    nested.pop("video_processor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image))
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    shutil.copy(folder / "tokenizer.json", tmp_path)
    assert OneVisionProcessing.from_folder(tmp_path) == OneVisionProcessing.from_folder(folder)


def rewrite(folder, tmp_path, file, change):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / file).read_text())
    change(data)
    (tmp_path / file).write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("file, change, message", [
    ("processor_config.json", lambda d: d["image_processor"].update(image_processor_type="CLIPImageProcessor"),
     "not a LLaVA-OneVision processor: image_processor_type 'CLIPImageProcessor'"),
    ("config.json", lambda d: d.update(model_type="llava"), "config.json model_type 'llava'"),
    ("processor_config.json", lambda d: d.update(vision_feature_select_strategy="default"), "not 'full'"),
    ("processor_config.json", lambda d: d.update(vision_aspect_ratio="anyres"), "not anyres_max_N"),
    ("processor_config.json", lambda d: d.update(num_image_tokens=9), "num_image_tokens 9"),
    ("config.json", lambda d: d.update(image_grid_pinpoints=[[56, 56]]), "image_grid_pinpoints differ"),
])
def test_from_folder_refuses(folders, tmp_path, file, change, message):
    with pytest.raises(ValueError, match=message):
        OneVisionProcessing.from_folder(rewrite(folders["s56"][0], tmp_path, file, change))


def test_refusals(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image processor settings"):
        OneVisionProcessing.from_folder(tmp_path)
    settings = OneVisionProcessing.from_folder(folders["s56"][0])
    with pytest.raises(ValueError, match="not multiples of the tile size 56"):
        OneVisionProcessing(**{**vars(settings), "pinpoints": ((56, 84),)})
    with pytest.raises(ValueError, match="expected an opaque RGB image, got mode 'L'"):
        preprocess_image(Image.new("L", (40, 30)), settings)
    with pytest.raises(ValueError, match="exactly one <image>, found 2"):
        batch_inputs([noise_image((40, 40))], ["<image><image>"], HFTokenizer(folders["s56"][0]), settings)
