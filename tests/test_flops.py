"""The analytic FLOP count of a generation against FlopCounterMode, and against arithmetic by hand."""

import pytest
import torch

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.flops import (
    CLIP_VIT_L14_336, DecoderShape, ImageCost, VisionShape, generation_cost, generation_flops, paper_scale_table,
)
from flexvlm.models.vision import TimmBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.reduction import FastV, PyramidDrop
from flexvlm.selection import CenterSelection

LLM = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)
ZOOM, TOP_K_BLOCKS, NEW_TOKENS = 2, 3, 5
NUM_SA = {"lr_only": 0, "hd": 0, "xattn": 0, "flex": 1}


def _model(mode: str) -> FlexVLM:
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs=dict(
        img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2))
    return FlexVLM(backbone, llm="tiny", llm_overrides=LLM, mode=mode, num_sa_layers=NUM_SA[mode], zoom=ZOOM,
                   selection=CenterSelection(top_k=TOP_K_BLOCKS) if mode == "flex" else None).eval()


def _batch() -> dict:
    # left padding: every sample costs the padded length
    ids = torch.tensor([[0, 0, IMAGE_TOKEN_INDEX, 5, 6, 7], [IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return {"prompt_ids": ids, "prompt_mask": mask, "images": torch.randn(2, 3, 64, 64)}


# the timm tower above: 32 px, patch 8, CLS token, layer -2 of 2 blocks -> one block runs
VISION = VisionShape(image_size=32, patch_size=8, width=24, depth=2, mlp_width=96, layer=-2, cls_token=True)


def test_vision_shape_runs_the_blocks_the_backbone_keeps():
    backbone = _model("lr_only").encoder.backbone
    assert len(backbone.model.blocks) == VISION.blocks_run == 1
    assert backbone.model.num_prefix_tokens == int(VISION.cls_token)
    assert CLIP_VIT_L14_336.blocks_run == 23


@pytest.mark.parametrize("mode, high_res_kv", [
    ("lr_only", None), ("hd", None), ("xattn", None), ("flex", "lazy"), ("flex", "prefill"),
])
def test_cost_model_matches_flop_counter(mode, high_res_kv):
    model = _model(mode)
    decoder = DecoderShape.from_config(model.config)
    k = TOP_K_BLOCKS * ZOOM**2  # a block is the zoom x zoom HR tokens under one low-res token
    # the center selection stays put, so lazy projection projects its K tokens once per FA layer
    projected = (ZOOM * VISION.grid) ** 2 if high_res_kv == "prefill" else k
    batch = _batch()
    predicted = generation_cost(mode, VISION, decoder, ImageCost.llava(VISION, ZOOM), NUM_SA[mode],
                                text_tokens=batch["prompt_ids"].shape[1] - 1,
                                new_tokens=NEW_TOKENS, selected_per_row=k, projected_hr_tokens=projected)
    options = {"high_res_kv": high_res_kv} if high_res_kv else {}
    measured = generation_flops(model, batch, NEW_TOKENS, eos_token_id=None, **options)
    assert measured == predicted.total, predicted


@pytest.mark.parametrize("reduction", [FastV(k=1, r=0.75), FastV(k=2, r=0.3), PyramidDrop(layers=[1, 2], ratio=0.5)])
def test_cost_model_matches_flop_counter_with_a_token_reduction(reduction):
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs=dict(
        img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2))
    model = FlexVLM(backbone, llm="tiny", llm_overrides=LLM, mode="hd", zoom=ZOOM, reduction=reduction).eval()
    batch = _batch()
    batch["prompt_mask"] = torch.ones_like(batch["prompt_mask"])  # one length: a drop re-pads a batch
    measured = generation_flops(model, batch, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    decoder = DecoderShape.from_config(model.config)
    predicted = generation_cost("hd", VISION, decoder, ImageCost.llava(VISION, ZOOM), 0,
                                text_tokens=batch["prompt_ids"].shape[1] - 1, new_tokens=NEW_TOKENS,
                                reduction=reduction)
    assert measured == predicted.total
    plain = generation_cost("hd", VISION, decoder, ImageCost.llava(VISION, ZOOM), 0,
                            text_tokens=batch["prompt_ids"].shape[1] - 1, new_tokens=NEW_TOKENS)
    assert predicted.decoder_linear < plain.decoder_linear and predicted.selection_overhead > 0


def test_flex_cost_by_hand():
    # one tower block of width 4 on a 2 x 2 grid (+ CLS), a 2-layer decoder, N_SA 1, K 2, 3 new tokens
    vision = VisionShape(image_size=16, patch_size=8, width=4, depth=1, mlp_width=8, layer=-1)
    decoder = DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)
    cost = generation_cost("flex", vision, decoder, ImageCost.llava(vision, zoom=2, projector="linear"),
                           num_sa_layers=1, text_tokens=3, new_tokens=3, selected_per_row=2, projected_hr_tokens=4)
    t = 5  # tokens per tower pass
    tower = 2 * 4 * (3 * 8 * 8) * 4 + 2 * t * 4 * 12 + 4 * t * t * 4 + 2 * t * 4 * 4 + 2 * 2 * t * 4 * 8
    assert cost.vision == 5 * tower  # low-res + 4 crops
    assert cost.projector == (4 + 16) * 2 * 4 * 8
    n = 3 + 4  # prompt: text + low-res tokens; decode steps see 8 and 9 keys
    per_token_layer = 2 * 8 * 8 * 2 + 2 * 8 * 4 * 2 + 2 * 8 * 16 * 3  # q, o; k, v (kv 4); gate, up, down
    assert cost.decoder_linear == (n + 2) * 2 * per_token_layer
    assert cost.attention == 2 * 4 * 8 * (n * n + 8 + 9)
    assert cost.lm_head == 3 * 2 * 8 * 10
    # one FA layer (1), one map layer (0), at each of the 3 forwards (prefill, 2 decode steps): the
    # selecting row's scores of the 2 x 2 low-res image keys (its map, from the kernel's log-sum-exp),
    # and that row over its K = 2 selected keys alone (merged with its sequence attention)
    assert cost.selection_overhead == 3 * (2 * 4 * 8 + 4 * 2 * 8)
    assert cost.hr_kv_projection == 1 * 4 * 2 * 2 * 8 * 4
    assert cost.cross_attention == 0
    assert cost.total == sum((cost.vision, cost.projector, cost.decoder_linear, cost.attention, cost.lm_head,
                              cost.selection_overhead, cost.hr_kv_projection))


def test_paper_scale_table_is_consistent():
    table = paper_scale_table()
    tflops = table["tflops"]
    assert tflops["flex"] == table["flex_by_size"]["1008"]
    assert tflops["lr_only"] < tflops["flex"] < tflops["xattn"] < tflops["hd_1008"]
    assert table["flex_all_projected"] > tflops["flex"]
    assert table["flex_linear_in_hr_tokens"]
    assert 0 < table["selection_overhead_share"] < 1 and 0 < table["hr_kv_projection_share"] < 1


def test_paper_scale_numbers_stay_put():
    # the LLaVA-1.5-7B figures docs/benchmarks.md reports, unchanged by the ImageCost generalisation
    tflops = paper_scale_table()["tflops"]
    assert {mode: round(value, 2) for mode, value in tflops.items()} == {
        "lr_only": 9.95, "hd_448": 16.53, "hd_1008": 87.21, "xattn": 26.55, "flex": 14.28}


def test_llava_image_cost_is_the_old_geometry():
    image = ImageCost.llava(CLIP_VIT_L14_336, 3)  # g = 24, M = 72^2
    assert [image.passes(m) for m in ("lr_only", "hd", "xattn", "flex")] == [1, 9, 10, 10]
    assert [image.sequence_tokens(m) for m in ("lr_only", "hd", "xattn", "flex")] == [576, 5184, 576, 576]
    assert [image.projected_tokens(m) for m in ("lr_only", "hd", "xattn", "flex")] == [576, 5184, 5760, 5760]
    assert image.hr_tokens == 5184
    assert image.projector_flops_per_token(4096) == 2 * 1024 * 4096 + 2 * 4096 * 4096  # mlp2x_gelu


# SmolVLM-shaped: a 512 px SigLIP B/16 (32 x 32 patches), pixel shuffle 4 -> 8 x 8 = 64 tokens a view
SIGLIP_512 = VisionShape(image_size=512, patch_size=16, width=768, depth=12, mlp_width=3072, layer=-1,
                         cls_token=False, final_norm=True)


def _smolvlm_processing(tile, longest_edge, seq_len):
    from torchvision.transforms import InterpolationMode

    from flexvlm.architectures.smolvlm.preprocess import SmolVLMProcessing

    return SmolVLMProcessing(family="smolvlm", tile_size=tile, longest_edge=longest_edge, do_image_splitting=True,
                             resample=InterpolationMode.LANCZOS, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                             rescale_factor=1 / 255, image_seq_len=seq_len)


def _count_prompt_tokens(text):
    """Tokens of an expanded SmolVLM image prompt, each special token and each newline one token."""
    import re

    pieces = re.findall(r"<fake_token_around_image>|<global-img>|<image>|<row_\d+_col_\d+>|\n", text)
    assert "".join(pieces) == text  # nothing else in an image's prompt
    return len(pieces)


def test_smolvlm_image_cost_by_hand():
    from flexvlm.architectures.smolvlm.preprocess import ImageLayout, image_prompt

    # 2 rows x 3 cols of 512 px tiles + the global view, 64 tokens each
    image = ImageCost.smolvlm(SIGLIP_512, rows=2, cols=3, scale_factor=4)
    # hd: 6 x (<fake> <row_i_col_j> 64) + a newline per row (2) + "\n" <fake> <global-img> 64 <fake>
    assert image.hd_sequence_tokens == 6 * 66 + 2 + 1 + 3 + 64 == 466
    assert image.lr_sequence_tokens == 3 + 64  # <fake> <global-img> 64 <fake>
    assert image.hr_tokens == 6 * 64
    assert [image.passes(m) for m in ("lr_only", "hd", "xattn", "flex")] == [1, 7, 7, 7]
    assert [image.projected_tokens(m) for m in ("lr_only", "hd", "flex")] == [64, 7 * 64, 7 * 64]
    assert image.projector_flops_per_token(576) == 2 * (768 * 16) * 576  # one Linear C s^2 -> D, no bias
    # the counts are the tokens of the prompt the preprocessing writes
    processing = _smolvlm_processing(512, 1536, 64)
    layout = ImageLayout(2, 3, 512, original_size=(1000, 1500), resized_size=(1024, 1536))
    assert _count_prompt_tokens(image_prompt(layout, processing)) == image.hd_sequence_tokens
    assert _count_prompt_tokens(image_prompt(layout, processing, global_only=True)) == image.lr_sequence_tokens
    assert ImageCost.from_layout(SIGLIP_512, layout, scale_factor=4) == image
    # an image that is its own only view: no tiles, the same prompt in every mode
    single = ImageCost.smolvlm(SIGLIP_512, 0, 0, 4)
    assert (single.hd_sequence_tokens, single.lr_sequence_tokens, single.hr_tokens) == (67, 67, 0)
    assert single.passes("hd") == single.passes("flex") == 1


def test_smolvlm_architecture_tiles_as_the_preprocessing_does():
    from flexvlm.architectures.smolvlm.preprocess import split_image
    from flexvlm.flops import ArchitectureShape

    # a 32 px tower (4 x 4 patches of 8), shuffle 2: a 64 x 96 image at longest edge 96 is 2 x 3 tiles
    vision = VisionShape(image_size=32, patch_size=8, width=8, depth=1, mlp_width=16, layer=-1, cls_token=False)
    decoder = DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)
    arch = ArchitectureShape("tiny", "-", "smolvlm", vision, decoder, scale_factor=2, longest_edge=96)
    image, words = arch.image((64, 96))
    split = split_image(torch.zeros(3, 64, 96, dtype=torch.uint8), _smolvlm_processing(32, 96, 4))
    assert (split.layout.rows, split.layout.cols, words) == (2, 3, "2 x 3 tiles + global view")
    assert image == ImageCost.from_layout(vision, split.layout, scale_factor=2)
    assert image.passes("hd") == split.pixel_values.shape[0] == 7


def _onevision_settings():
    from flexvlm.architectures.llava_onevision.preprocess import OneVisionProcessing
    from flexvlm.flops import ONEVISION_PINPOINTS

    return OneVisionProcessing(tile_size=384, patch_size=14, pinpoints=ONEVISION_PINPOINTS, max_views=9,
                               image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


SO400M_26 = VisionShape(image_size=384, patch_size=14, width=1152, depth=26, mlp_width=4304, layer=-1, cls_token=False)


def test_onevision_image_cost_with_unpadding():
    from flexvlm.architectures.llava_onevision.preprocess import image_layout

    # 500 x 1000 (h x w): the 768 x 1152 canvas (2 x 3 tiles, 54 x 81 grid tokens) shows all of it; the
    # image is 2:1, wider than the grid's 1.5:1, so (54 - int(500 x 81 / 1000)) // 2 = 7 token rows are
    # cut at the top and at the bottom: 40 x 81, under the anyres_max_9 budget (9 x 729), not shrunk
    layout = image_layout((500, 1000), _onevision_settings())
    assert (layout.grid, layout.unpadded_grid, layout.feature_grid) == ((2, 3), (40, 81), (40, 81))
    image = ImageCost.from_layout(SO400M_26, layout)
    assert image == ImageCost.onevision(SO400M_26, 2, 3, (40, 81))
    assert image.hd_sequence_tokens == 729 + 40 * 82 == layout.num_tokens == 4009  # base + rows with a newline each
    assert image.lr_sequence_tokens == 729 + 1  # the base view and one newline
    assert image.hr_tokens == 40 * 81
    assert [image.passes(m) for m in ("lr_only", "hd", "xattn", "flex")] == [1, 7, 7, 7] == [1] + [layout.num_views] * 3
    # the projector runs on every view's 729 tokens, the tiles' before they are unpadded
    assert [image.projected_tokens(m) for m in ("lr_only", "hd", "flex")] == [729, 7 * 729, 7 * 729]


def test_onevision_image_cost_with_the_shrink():
    from flexvlm.architectures.llava_onevision.preprocess import image_layout
    from flexvlm.architectures.smolvlm.preprocess import ImageLayout

    # 1000 x 3000 (3:1): the 768 x 2304 canvas (2 x 6 tiles) fits it exactly: 54 x 162 = 8,748 grid
    # tokens, over 1.1 x the budget 9 x 729 = 6,561 (ratio sqrt(8748 / 6561) = 1.155): shrunk to
    # (54 // 1.155, 162 // 1.155) = 46 x 140
    layout = image_layout((1000, 3000), _onevision_settings())
    assert (layout.grid, layout.unpadded_grid, layout.feature_grid) == ((2, 6), (54, 162), (46, 140))
    image = ImageCost.from_layout(SO400M_26, layout)
    assert image.hd_sequence_tokens == 729 + 46 * 141 == layout.num_tokens
    assert image.hr_tokens == 46 * 140
    assert image.passes("flex") == 13 and image.projected_tokens("hd") == 13 * 729
    with pytest.raises(ValueError, match="scale_factor"):  # a SmolVLM layout needs the connector's
        ImageCost.from_layout(SO400M_26, ImageLayout(1, 2, 384, (1, 2), (384, 768)))


def test_architecture_scale_table_is_consistent():
    from flexvlm.flops import architecture_scale_table, format_architecture_table

    table = architecture_scale_table()
    assert {name: model["num_sa_layers"] for name, model in table["models"].items()} == {
        "SmolVLM-256M": 8, "SmolVLM-500M": 9, "SmolVLM-2.2B": 7, "LLaVA-OV-0.5B": 7, "LLaVA-OV-7B": 8}
    for model in table["models"].values():
        for row in model["rows"]:
            t = row["tflops"]
            assert t["lr_only"] < t["flex"] < t["xattn"] < t["hd"]
            assert row["selected_per_row"] == round(0.1 * row["hr_tokens"])
    ov = table["models"]["LLaVA-OV-7B"]["rows"]
    assert [row["layout"] for row in ov][-1] == "base + 6 x 6 tiles, grid 162 x 162 shrunk to 81 x 81"
    assert ov[-1]["sequence_tokens"] == {"hd": 729 + 81 * 82, "flex": 730}
    smol = table["models"]["SmolVLM-256M"]["rows"]
    assert [row["layout"] for row in smol] == ["2 x 2 tiles + global view", "4 x 4 tiles + global view"]
    assert smol[1]["sequence_tokens"] == {"hd": 16 * 66 + 4 + 1 + 67, "flex": 67}
    assert format_architecture_table(table).count("\n") == 2 + sum(len(m["rows"]) for m in table["models"].values()) - 1


# --- prediction == measurement on the other architectures' geometries (tiny models, every mode) ----------------

def _splice_prompt(pieces_before, image_ids, pieces_after, length):
    """Left-padded ids: text, the image's ids, text, padded with 0 to ``length``."""
    row = [*pieces_before, *image_ids, *pieces_after]
    return [0] * (length - len(row)) + row, [0] * (length - len(row)) + [1] * len(row)


def _agreement(model, batch, mode, vision, image, high_res_kv, k):
    """Predicted and measured FLOPs per sample of a NEW_TOKENS-token generation."""
    decoder = DecoderShape.from_config(model.config)
    projected = image.hr_tokens if high_res_kv == "prefill" else k
    predicted = generation_cost(mode, vision, decoder, image, NUM_SA[mode],
                                text_tokens=batch["prompt_ids"].shape[1] - image.sequence_tokens(mode),
                                new_tokens=NEW_TOKENS, selected_per_row=k, projected_hr_tokens=projected)
    options = {"high_res_kv": high_res_kv} if high_res_kv else {}
    return predicted, generation_flops(model, batch, NEW_TOKENS, eos_token_id=None, **options)


MODES_AND_KV = [("lr_only", None), ("hd", None), ("xattn", None), ("flex", "lazy"), ("flex", "prefill")]
# SmolVLM-shaped: 32 px tiles of 8 px patches (4 x 4), pixel shuffle 2 -> 2 x 2 tokens a view; a 64 x 96 image at
# longest edge 96 is 2 x 3 tiles, a 4 x 6 high-res grid over the global view's 2 x 2 cells (6 tokens a cell)
SMOL_VISION = VisionShape(image_size=32, patch_size=8, width=16, depth=2, mlp_width=32, layer=-1, cls_token=False,
                          final_norm=True)
SMOL_SPECIAL = {"<fake_token_around_image>": 3, "<global-img>": 4, "\n": 2}


def _smolvlm_batch(mode):
    import re

    from flexvlm.architectures.smolvlm.preprocess import collate, image_prompt, split_image

    processing = _smolvlm_processing(32, 96, 4)
    generator = torch.Generator().manual_seed(0)
    splits = [split_image(torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=generator), processing)
              for _ in range(2)]
    images = collate([[split] for split in splits])
    text = image_prompt(splits[0].layout, processing, global_only=mode != "hd")
    pieces = re.findall(r"<fake_token_around_image>|<global-img>|<image>|<row_\d+_col_\d+>|\n", text)
    image_ids = [IMAGE_TOKEN_INDEX if p == "<image>" else SMOL_SPECIAL.get(p, 10) for p in pieces]
    rows = [_splice_prompt([5], image_ids, [6, 7], len(image_ids) + 5),
            _splice_prompt([5, 8, 9], image_ids, [6, 7], len(image_ids) + 5)]
    return {"prompt_ids": torch.tensor([r[0] for r in rows]), "prompt_mask": torch.tensor([r[1] for r in rows]),
            "images": images}, splits[0].layout


@pytest.mark.parametrize("mode, high_res_kv", MODES_AND_KV)
def test_cost_model_matches_flop_counter_on_smolvlm_tiles(mode, high_res_kv):
    from flexvlm.architectures.smolvlm import Connector, TiledEncoder
    from flexvlm.models.siglip import siglip_tower

    torch.manual_seed(0)
    tower = siglip_tower({"model_type": "smolvlm_vision", "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         layer=-1, final_norm=True)
    model = FlexVLM(encoder=TiledEncoder(tower, 2), projector=Connector(16 * 4, LLM["hidden_size"]), llm="tiny",
                    llm_overrides=LLM, mode=mode, num_sa_layers=NUM_SA[mode],
                    selection=CenterSelection(top_k=2) if mode == "flex" else None).eval()
    batch, layout = _smolvlm_batch(mode)
    image = ImageCost.from_layout(SMOL_VISION, layout, scale_factor=2)
    assert (layout.rows, layout.cols, image.hr_tokens, image.hd_sequence_tokens) == (2, 3, 24, 6 * 6 + 2 + 1 + 7)
    # the two central cells of the 2 x 2 (all equidistant: the first two, row-major), 6 high-res tokens each
    predicted, measured = _agreement(model, batch, mode, SMOL_VISION, image, high_res_kv, k=2 * 6)
    assert measured == predicted.total, predicted


# LLaVA-OneVision-shaped: 28 px views of 7 px patches (g = 4), a 56 x 56 image on the 2 x 2 pinpoint: an 8 x 8
# grid, over anyres_max_2's budget (2 x 16 x 1.1^2): shrunk to 5 x 5; the projector runs on all 5 views' 16 tokens
OV_VISION = VisionShape(image_size=28, patch_size=7, width=16, depth=2, mlp_width=32, layer=-1, cls_token=False)
OV_PINPOINTS = ((28, 28), (28, 56), (56, 28), (56, 56))


def _onevision_batch(mode, settings):
    from flexvlm.architectures.llava_onevision.preprocess import OneVisionBatch, preprocess_image

    generator = torch.Generator().manual_seed(0)
    views, layouts = zip(*(preprocess_image(torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8,
                                                          generator=generator), settings) for _ in range(2)))
    count = ImageCost.from_layout(OV_VISION, layouts[0]).sequence_tokens(mode)
    rows = [_splice_prompt([5], [IMAGE_TOKEN_INDEX] * count, [6, 7], count + 5),
            _splice_prompt([5, 8, 9], [IMAGE_TOKEN_INDEX] * count, [6, 7], count + 5)]
    ids, mask = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    images = OneVisionBatch(ids, mask, torch.stack(views), torch.tensor([layout.image_size for layout in layouts]),
                            list(layouts))
    return {"prompt_ids": ids, "prompt_mask": mask, "images": images}, layouts[0]


@pytest.mark.parametrize("mode, high_res_kv", MODES_AND_KV)
def test_cost_model_matches_flop_counter_on_onevision_anyres(mode, high_res_kv):
    from flexvlm.architectures.llava_onevision import AnyresEncoder
    from flexvlm.architectures.llava_onevision.preprocess import OneVisionProcessing, base_cell_of_grid_tokens
    from flexvlm.models.siglip import siglip_tower

    torch.manual_seed(0)
    tower = siglip_tower({"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 7},
                         layer=-1, final_norm=False)
    model = FlexVLM(encoder=AnyresEncoder(tower, LLM["hidden_size"], OV_PINPOINTS, 2),
                    projector="mlp2x_gelu", llm="tiny", llm_overrides=LLM, mode=mode,
                    num_sa_layers=NUM_SA[mode],
                    selection=CenterSelection(top_k=4) if mode == "flex" else None).eval()
    settings = OneVisionProcessing(tile_size=28, patch_size=7, pinpoints=OV_PINPOINTS, max_views=2,
                                   image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    batch, layout = _onevision_batch(mode, settings)
    image = ImageCost.from_layout(OV_VISION, layout)
    assert (layout.grid, layout.unpadded_grid, layout.feature_grid) == ((2, 2), (8, 8), (5, 5))
    assert (image.hr_tokens, image.hd_sequence_tokens, image.projected_tokens("hd")) == (25, 16 + 5 * 6, 5 * 16)
    # the 4 central cells of the 4 x 4 base view; K: the grid tokens whose centre they cover
    k = int(torch.isin(base_cell_of_grid_tokens(layout), torch.tensor([5, 6, 9, 10])).sum())
    predicted, measured = _agreement(model, batch, mode, OV_VISION, image, high_res_kv, k)
    assert measured == predicted.total, predicted
