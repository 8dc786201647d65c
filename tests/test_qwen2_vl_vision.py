"""The Qwen2-VL and Qwen2.5-VL vision towers (flexvlm/architectures/qwen2_vl/vision.py) against transformers'
(``model.visual`` of tiny random ``*ForConditionalGeneration`` models saved offline), in float32, and their
geometry helpers against transformers' own (``transformers.vision_utils``)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # noqa: E402

from flexvlm.architectures.qwen2_vl.vision import (  # noqa: E402
    QwenVisionTower,
    VisionSettings,
    load_vision_tower,
    patch_positions,
    vision_state,
    window_order,
)
from flexvlm.weights import load_state_dict_strict, read_checkpoint  # noqa: E402

TEXT = {"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}}
# tiny towers, patch 14 and merge 2 as the checkpoints: Qwen2-VL's width 32, 4 heads of 8, MLP 64; Qwen2.5-VL's
# the same with a gated MLP of 40, windows of 56 px (2 x 2 merge blocks), full attention in blocks 1 and 3
MODELS = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                 {"depth": 2, "embed_dim": 32, "hidden_size": 24, "num_heads": 4, "mlp_ratio": 2}),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                   {"depth": 4, "hidden_size": 32, "intermediate_size": 40, "out_hidden_size": 24, "num_heads": 4,
                    "window_size": 56, "fullatt_block_indexes": [1, 3]}),
}
# (t, h, w) patches; 6 x 10 merges to 3 x 5 blocks, which 2 x 2 windows cut unevenly; t = 2 is a clip
GRIDS = {"one": [(1, 6, 10)], "two-sizes": [(1, 4, 8), (1, 6, 4)], "three-with-a-clip": [(1, 2, 2), (2, 4, 4),
                                                                                           (1, 10, 6)]}
TOLERANCE = 1e-6  # float32, the same operations in another order (matrix product for the Conv3d...); measured <= 2e-7


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """(folder, transformers' tower of the model saved there) of a tiny random model, every weight drawn at
    random (the default init leaves the norms at one and the biases at zero)."""
    config_class, model_class, vision = MODELS[request.param]
    torch.manual_seed(0)
    model = model_class(config_class(vision_config=vision, text_config=TEXT)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("grids", list(GRIDS))
def test_tower_equals_transformers(saved, grids):
    folder, model = saved
    grid_thw = torch.tensor(GRIDS[grids])
    tower = load_vision_tower(folder).eval()
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), tower.settings.patch_dim,
                               generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.model.visual(pixel_values, grid_thw=grid_thw).pooler_output
        actual = tower(pixel_values, grid_thw)
    assert actual.shape == expected.shape == (int(grid_thw.prod(-1).sum()) // 4, 24)
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE)
    assert expected.abs().max() > 0.1  # not a degenerate comparison


def test_each_image_alone_as_in_a_batch(saved):
    """Attention stays inside each image: an image's tokens are the same alone and beside another."""
    tower = load_vision_tower(saved[0]).eval()
    grids = GRIDS["two-sizes"]
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), tower.settings.patch_dim)
    with torch.no_grad():
        both = tower(pixel_values, grids)
        first = tower(pixel_values[: 32], grids[:1])
    torch.testing.assert_close(both[: 8], first, rtol=0, atol=TOLERANCE)


def test_state_dict_names(saved):
    """transformers 5 saves the tower under visual. (the hub's layout) and holds it under model.visual.: both
    load by name once the prefix is gone."""
    folder, model = saved
    on_disk = read_checkpoint(folder)
    assert any(k.startswith("visual.blocks.0.") for k in on_disk) and not any(k.startswith("model.visual.")
                                                                               for k in on_disk)
    in_memory = vision_state(model.state_dict(), "memory")
    tower = QwenVisionTower(VisionSettings.from_config(json.loads((folder / "config.json").read_text())))
    assert set(in_memory) == set(tower.state_dict()) == set(vision_state(on_disk, str(folder)))
    tower.load_state_dict(in_memory, strict=True)


@pytest.mark.parametrize("grids", list(GRIDS))
def test_patch_positions_and_windows_equal_transformers(grids):
    grid_thw = torch.tensor(GRIDS[grids])
    torch.testing.assert_close(patch_positions(GRIDS[grids], 2), get_vision_position_ids(grid_thw, 2), rtol=0, atol=0)
    order, windows = window_order(GRIDS[grids], 2, 2)
    expected_order, expected_bounds = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=56,
                                                              patch_size=14)
    torch.testing.assert_close(order, expected_order, rtol=0, atol=0)
    assert [0] + [end for _, end in windows] == expected_bounds.tolist()


def test_windows_by_hand():
    """A 3 x 5 grid of merge blocks in 2 x 2 windows: rows 0-1 then row 2, columns 0-1, 2-3, 4."""
    order, windows = window_order([(1, 6, 10)], 2, 2)
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert [(b - a) // 4 for a, b in windows] == [4, 4, 2, 2, 2, 1]


def test_settings_from_hub_config():
    """The hub's Qwen2.5-VL-7B vision_config (no model_type in it, in_chans instead of in_channels)."""
    hub = {"model_type": "qwen2_5_vl", "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2}}
    settings = VisionSettings.from_config(hub)
    assert (settings.width, settings.head_dim, settings.mlp_width, settings.out_width) == (1280, 80, 3420, 3584)
    assert (settings.window_blocks, settings.full_attention_blocks, settings.rope_theta) == (4, (7, 15, 23, 31),
                                                                                             10000.0)
    qwen2 = VisionSettings.from_config({"model_type": "qwen2_vl", "vision_config": {"embed_dim": 1280,
                                                                                     "hidden_size": 1536}})
    assert (qwen2.width, qwen2.mlp_width, qwen2.out_width, qwen2.hidden_act) == (1280, 5120, 1536, "quick_gelu")


def test_refusals(saved):
    folder = saved[0]
    tower = load_vision_tower(folder)
    with pytest.raises(ValueError, match="multiples of the merge size 2; these are not: \\[\\(1, 3, 4\\)\\]"):
        tower(torch.zeros(12, tower.settings.patch_dim), [(1, 3, 4)])
    with pytest.raises(ValueError, match=r"pixel_values \(10, 1176\): the grids \[\(1, 2, 4\)\] hold 8 patches"):
        tower(torch.zeros(10, 1176), [(1, 2, 4)])
    state = vision_state(read_checkpoint(folder), str(folder))
    del state["merger.ln_q.weight"]
    with pytest.raises(ValueError, match="(?s)missing.*merger.ln_q.weight"):
        load_state_dict_strict(tower, state, str(folder))
    with pytest.raises(ValueError, match="no vision tower tensors"):
        vision_state({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)}, "text only")
    bad = {"model_type": "qwen2_vl", "vision_config": {"embed_dim": 36, "num_heads": 6, "hidden_act": "relu"}}
    with pytest.raises(ValueError, match="(?s)head_dim 6: the 2-D RoPE needs a multiple of 4.*hidden_act 'relu'"):
        VisionSettings.from_config(bad)
    with pytest.raises(ValueError, match="model_type 'llava'"):
        VisionSettings.from_config({"model_type": "llava"})
    windows = {"model_type": "qwen2_5_vl", "vision_config": {"window_size": 20, "fullatt_block_indexes": [40]}}
    with pytest.raises(ValueError, match="(?s)window_size 20: less than one merge block.*outside the 32 blocks"):
        VisionSettings.from_config(windows)
