"""Vision backbones against timm's / open_clip's own forwards, hand-made references and error cases."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from flexvlm.models.vision import OpenClipBackbone, PatchMLPBackbone, TimmBackbone, TimmFeatureMapBackbone

TIMM_KW = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)
VISION_CFG = dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16)
OPEN_CLIP_KW = dict(
    embed_dim=32, vision_cfg=VISION_CFG, text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
)


def _open_clip(vision_cfg: dict = VISION_CFG) -> nn.Module:
    return open_clip.create_model("ViT-B-16", pretrained=None, **{**OPEN_CLIP_KW, "vision_cfg": vision_cfg}).eval()


def _resample_by_hand(pos: torch.Tensor, grid: int, new_grid: tuple[int, int]) -> torch.Tensor:
    """(N, C) patch position embeddings on a grid x grid -> new_grid, bicubic with antialias like timm."""
    image = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    return image.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_siglip_224"])
def test_timm_matches_forward_intermediates(tmp_path, name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **TIMM_KW).eval()
    path = tmp_path / "timm.safetensors"
    save_file(reference.state_dict(), path)
    for layer in [-2, 0]:
        backbone = TimmBackbone(name, layer=layer, checkpoint_path=path, model_kwargs=TIMM_KW).eval()
        assert (backbone.image_size, backbone.patch_size, backbone.embed_dim, backbone.grid_size) == (32, 8, 48, 4)
        assert backbone.mean == tuple(reference.pretrained_cfg["mean"])
        for size in [(32, 32), (48, 24)]:  # native, then another size through timm's own resampling
            x = torch.randn(2, 3, *size)
            (expected,) = reference.forward_intermediates(x, indices=[layer], intermediates_only=True, output_fmt="NLC")
            tokens = backbone(x)
            assert tokens.shape == (2, size[0] // 8 * size[1] // 8, 48)  # no class token, even for the CLIP-like ViT
            torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize("layer", [-2, 0, 2])
def test_open_clip_matches_its_forward_intermediates(tmp_path, layer):
    torch.manual_seed(0)
    reference = _open_clip()
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)  # full CLIP: visual.* and text keys
    backbone = OpenClipBackbone("ViT-B-16", layer=layer, checkpoint_path=path, model_kwargs=OPEN_CLIP_KW).eval()
    assert (backbone.grid_size, backbone.embed_dim) == (4, 32)
    assert backbone.mean == open_clip.OPENAI_DATASET_MEAN and backbone.std == open_clip.OPENAI_DATASET_STD
    x = torch.randn(2, 3, 32, 32)
    out = reference.visual.forward_intermediates(x, indices=[layer], intermediates_only=True, output_fmt="NLC")
    (expected,) = out["image_intermediates"]  # class token already split off by open_clip
    assert expected.shape == (2, 16, 32)
    torch.testing.assert_close(backbone(x), expected)


def test_open_clip_accepts_vision_tower_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = _open_clip()
    path = tmp_path / "visual.safetensors"
    save_file(reference.visual.state_dict(), path)
    backbone = OpenClipBackbone("ViT-B-16", layer=-1, checkpoint_path=path, model_kwargs=OPEN_CLIP_KW).eval()
    x = torch.randn(1, 3, 32, 32)
    (expected,) = reference.visual.forward_intermediates(x, indices=[-1], intermediates_only=True, output_fmt="NLC")[
        "image_intermediates"
    ]
    torch.testing.assert_close(backbone(x), expected)


def test_open_clip_other_size_equals_model_built_for_that_size(tmp_path):
    torch.manual_seed(0)
    native = _open_clip()
    torch.save(native.state_dict(), tmp_path / "clip.pt")
    backbone = OpenClipBackbone("ViT-B-16", checkpoint_path=tmp_path / "clip.pt", model_kwargs=OPEN_CLIP_KW).eval()
    # an open_clip model built for 48 x 64 images, given the resampled position embeddings
    large = _open_clip({**VISION_CFG, "image_size": (48, 64)})
    state = native.visual.state_dict()
    pos = state["positional_embedding"]
    state["positional_embedding"] = torch.cat([pos[:1], _resample_by_hand(pos[1:], 4, (6, 8))])
    large.visual.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64)
    (expected,) = large.visual.forward_intermediates(x, indices=[-2], intermediates_only=True, output_fmt="NLC")[
        "image_intermediates"
    ]
    torch.testing.assert_close(backbone(x), expected)


def test_vit_l_14_336_gives_576_tokens_of_1024():
    with torch.device("meta"):  # no memory, no init: only the geometry is checked
        backbone = OpenClipBackbone("ViT-L-14-336", model_kwargs=dict(device="meta"))
    assert (backbone.image_size, backbone.patch_size, backbone.grid_size, backbone.embed_dim) == (336, 14, 24, 1024)
    assert len(backbone.visual.transformer.resblocks) == 23  # 24 layers, penultimate kept
    assert backbone(torch.empty(1, 3, 336, 336, device="meta")).shape == (1, 576, 1024)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still what OpenAI shipped
def test_open_clip_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.trace(nn.Linear(2, 2), torch.randn(1, 2)).save(str(path))
    with pytest.raises(ValueError, match="TorchScript.*state dict"):
        OpenClipBackbone("ViT-B-16", checkpoint_path=path, model_kwargs=OPEN_CLIP_KW)


def test_patch_mlp_tokens_are_row_major_and_per_patch():
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 64)  # a 4 x 8 grid
    y = x.clone()
    y[:, :, 8:16, 16:24] += 1.0  # patch at row 1, column 2
    changed = (backbone(x) - backbone(y)).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [1 * 8 + 2]


def test_patch_mlp_resamples_position_embeddings_bicubically():
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 40, 56)
    patches = backbone.patch_embed(x).flatten(2).transpose(1, 2)
    expected = backbone.norm(backbone.blocks(patches + _resample_by_hand(backbone.pos_embed[0], 4, (5, 7))))
    torch.testing.assert_close(backbone(x), expected)


def test_patch_mlp_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = PatchMLPBackbone(embed_dim=16, hidden_dim=32)
    x = torch.randn(2, 3, 32, 32)
    for path, save in [(tmp_path / "a.pt", torch.save), (tmp_path / "a.safetensors", save_file)]:
        save(source.state_dict(), path)
        loaded = PatchMLPBackbone(embed_dim=16, hidden_dim=32, checkpoint_path=path)
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_checkpoint_mismatch_lists_names_and_shapes(tmp_path):
    state = PatchMLPBackbone(embed_dim=16, hidden_dim=32).state_dict()
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(2, 3)
    state["pos_embed"] = torch.zeros(1, 9, 16)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        PatchMLPBackbone(embed_dim=16, hidden_dim=32, checkpoint_path=path)
    message = str(error.value)
    assert str(path) in message
    assert "missing (1):\n    norm.bias (16,)" in message
    assert "unexpected (1):\n    extra.weight (2, 3)" in message
    assert "pos_embed: checkpoint (1, 9, 16) vs model (1, 16, 16)" in message


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        TimmBackbone("vit_tiny_patch16_224", checkpoint_path=path, model_kwargs=TIMM_KW)


def test_frozen_stays_frozen_in_train_mode():
    backbone = TimmBackbone("vit_tiny_patch16_224", frozen=True, model_kwargs={**TIMM_KW, "proj_drop_rate": 0.5})
    parent = nn.Sequential(backbone, nn.Linear(48, 2)).train()
    assert parent.training and parent[1].training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(backbone(x), backbone(x))  # dropout stays off


def test_unfrozen_backbone_trains():
    backbone = PatchMLPBackbone().train()
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
    backbone(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_bad_layer_and_bad_image_size():
    with pytest.raises(ValueError, match="layer 3 is out of range for 3 blocks"):
        TimmBackbone("vit_tiny_patch16_224", layer=3, model_kwargs=TIMM_KW)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        PatchMLPBackbone()(torch.randn(1, 3, 32, 30))


def _feature_map_by_hand(model: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """The stride-8 feature map, run module by module as timm's models are written."""
    if name == "convnext_atto":
        return model.stages[1](model.stages[0](model.stem(images)))
    x = model.maxpool(model.act1(model.bn1(model.conv1(images))))
    return model.layer2(model.layer1(x))


@pytest.mark.parametrize("name, stage", [("convnext_atto", 1), ("resnet18", 2)])
def test_feature_map_tower_matches_the_network_run_by_hand(tmp_path, name, stage):
    """A position of the chosen stage's map is a token, row-major, for any image size that is a
    multiple of the stage's reduction; weights load from the timm model's own state dict."""
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = TimmFeatureMapBackbone(name, stage=stage, image_size=32, checkpoint_path=path).eval()
    assert (backbone.patch_size, backbone.grid_size) == (8, 4)
    assert backbone.embed_dim == reference.feature_info[stage]["num_chs"]
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = _feature_map_by_hand(reference, name, images)  # (B, C, 4, 6)
        tokens = backbone(images)
    assert tokens.shape == (2, 4 * 6, backbone.embed_dim)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens[:, 6 + 2], expected[:, :, 1, 2])  # row 1, column 2


def test_feature_map_tower_errors():
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of stage 1's reduction 8"):
        TimmFeatureMapBackbone("convnext_atto", stage=1, image_size=36)
    with pytest.raises(ValueError, match="stage 4 is out of range for 4 stages"):
        TimmFeatureMapBackbone("convnext_atto", stage=4, image_size=32)
