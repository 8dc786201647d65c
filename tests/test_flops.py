"""The analytic FLOP count of a generation against FlopCounterMode, and against arithmetic by hand."""

import pytest
import torch

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.flops import (
    CLIP_VIT_L14_336, DecoderShape, VisionShape, generation_cost, generation_flops, paper_scale_table,
)
from flexvlm.models.vision import TimmBackbone
from flexvlm.models.vlm import FlexVLM
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
    predicted = generation_cost(mode, VISION, decoder, ZOOM, NUM_SA[mode], text_tokens=batch["prompt_ids"].shape[1] - 1,
                                new_tokens=NEW_TOKENS, selected_per_row=k, projected_hr_tokens=projected)
    options = {"high_res_kv": high_res_kv} if high_res_kv else {}
    measured = generation_flops(model, batch, NEW_TOKENS, eos_token_id=None, **options)
    assert measured == predicted.total, predicted


def test_flex_cost_by_hand():
    # one tower block of width 4 on a 2 x 2 grid (+ CLS), a 2-layer decoder, N_SA 1, K 2, 3 new tokens
    vision = VisionShape(image_size=16, patch_size=8, width=4, depth=1, mlp_width=8, layer=-1)
    decoder = DecoderShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)
    cost = generation_cost("flex", vision, decoder, zoom=2, num_sa_layers=1, text_tokens=3, new_tokens=3,
                           selected_per_row=2, projected_hr_tokens=4, projector="linear")
    t = 5  # tokens per tower pass
    tower = 2 * 4 * (3 * 8 * 8) * 4 + 2 * t * 4 * 12 + 4 * t * t * 4 + 2 * t * 4 * 4 + 2 * 2 * t * 4 * 8
    assert cost.vision == 5 * tower  # low-res + 4 crops
    assert cost.projector == (4 + 16) * 2 * 4 * 8
    n = 3 + 4  # prompt: text + low-res tokens; decode steps see 8 and 9 keys
    per_token_layer = 2 * 8 * 8 * 2 + 2 * 8 * 4 * 2 + 2 * 8 * 16 * 3  # q, o; k, v (kv 4); gate, up, down
    assert cost.decoder_linear == (n + 2) * 2 * per_token_layer
    assert cost.attention == 2 * 4 * 8 * (n * n + 8 + 9)
    assert cost.lm_head == 3 * 2 * 8 * 10
    # one FA layer (1), one map layer (0): map scores at prefill, the selecting row over n + K keys
    # at prefill, the K selected keys at each of the 2 decode steps
    assert cost.selection_overhead == 2 * n * 8 + 4 * (n + 2) * 8 + 2 * 4 * 2 * 8
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
