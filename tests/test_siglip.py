"""SigLIP towers (flexvlm/models/siglip.py) against transformers' own SiglipVisionModel,
Idefics3VisionTransformer and SmolVLMVisionTransformer on tiny random configs (every tensor
perturbed, so that a norm's weight or a bias left out shows), and the error cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexvlm.models.siglip import (
    SIGLIP_MEAN, SIGLIP_STD, _navit_positions, load_siglip, siglip_from_hf, siglip_to_hf, siglip_tower,
)
from flexvlm.models.vision import TimmBackbone
from flexvlm.weights import read_checkpoint, read_config

transformers = pytest.importorskip("transformers")
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionConfig, Idefics3VisionTransformer  # noqa: E402
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionConfig, SmolVLMVisionTransformer  # noqa: E402

# 28 px, patch 7: a 4 x 4 grid; intermediate 37: 37 / 32 is no round mlp_ratio
SHAPE = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=28,
             patch_size=7)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises biases to 0 and norms to 1 / 0: every tensor gets noise."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A SiglipVisionModel (with its pooling head) saved by save_pretrained, its tensors read back."""
    torch.manual_seed(0)
    model = _perturbed(SiglipVisionModel(SiglipVisionConfig(**SHAPE, hidden_act="gelu_pytorch_tanh",
                                                            layer_norm_eps=1e-5)))
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    return model, read_checkpoint(folder), read_config(folder)


def _images(size: int = 28, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def _loaded(config: dict, state: dict, prefix: str, **kwargs) -> TimmBackbone:
    backbone = siglip_tower(config, **kwargs)
    load_siglip(backbone, state, prefix, "test checkpoint")
    return backbone.eval()


@pytest.mark.parametrize("layer, final_norm", [(-1, False), (-1, True), (-2, False), (1, False), (3, True)])
def test_siglip_vision_model_hidden_states(siglip, layer, final_norm):
    """hidden_states[layer] (LLaVA-OneVision's features, before post_layernorm), and with final_norm
    last_hidden_state (after it); transformers 5 saves a SiglipVisionModel without `vision_model.`."""
    model, state, config = siglip
    assert "head.probe" in state and "embeddings.patch_embedding.weight" in state  # the head is there, ignored
    backbone = _loaded(config, state, "", layer=layer, final_norm=final_norm)
    assert (backbone.image_size, backbone.patch_size, backbone.grid_size, backbone.embed_dim) == (28, 7, 4, 32)
    assert backbone.mean == SIGLIP_MEAN == (0.5, 0.5, 0.5) and backbone.std == SIGLIP_STD
    assert len(backbone.model.blocks) == layer % 4  # hidden_states[k] is the output of the k-th block
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * len(backbone.model.blocks) + final_norm and {m.eps for m in norms} == {1e-5}
    images = _images()
    with torch.no_grad():
        out = model(images, output_hidden_states=True)
        tokens = backbone(images)
    expected = out.last_hidden_state if final_norm else out.hidden_states[layer]
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    if final_norm:  # the comparison sees the norm: without it the tokens are another layer's
        assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state, atol=1e-2)


@pytest.mark.parametrize("prefix", ["vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                    "vision_tower.", "model.vision_tower."])
def test_prefixes_of_the_hub_and_of_llava_onevision(siglip, prefix):
    """The hub's SiglipVisionModel (`vision_model.`), LLaVA-OneVision's layouts, with other parts of
    the model beside the tower."""
    model, state, config = siglip
    vlm = {prefix + k: v for k, v in state.items()}
    vlm["model.language_model.embed_tokens.weight"] = torch.zeros(5, 8)
    vlm["multi_modal_projector.linear_1.weight"] = torch.zeros(8, 32)
    backbone = _loaded(config, vlm, prefix, layer=-1)
    images = _images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model(images, output_hidden_states=True).hidden_states[-1],
                                   atol=1e-5, rtol=1e-5)


def test_a_swapped_conversion_is_seen(siglip):
    """The comparison above is sensitive: q and k exchanged in one block give other tokens."""
    model, state, config = siglip
    swapped = dict(state)
    for kind in ("weight", "bias"):
        q, k = f"encoder.layers.1.self_attn.q_proj.{kind}", f"encoder.layers.1.self_attn.k_proj.{kind}"
        swapped[q], swapped[k] = state[k], state[q]
    backbone = _loaded(config, swapped, "", layer=-1)
    images = _images(batch=1)
    with torch.no_grad():
        expected = model(images, output_hidden_states=True).hidden_states[-1]
        assert not torch.allclose(backbone(images), expected, atol=1e-3)


def test_uncropped_sizes_match_transformers_on_the_cropped_image(siglip):
    """transformers' stride-p convolution ignores the last image_size % p pixels of a side (e.g. 384 px,
    patch 14); flexvlm refuses such an image and gives the same tokens for it cropped."""
    model, state, _ = siglip
    model_30 = _perturbed(SiglipVisionModel(SiglipVisionConfig(**{**SHAPE, "image_size": 30}, layer_norm_eps=1e-5)))
    model_30.load_state_dict(model.state_dict())
    backbone = _loaded({**SHAPE, "model_type": "siglip_vision_model", "image_size": 30, "layer_norm_eps": 1e-5},
                       state, "", layer=-1, final_norm=True)
    assert (backbone.image_size, backbone.grid_size) == (30, 4)
    images = _images(30, batch=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size 7"):
        backbone(images)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images[..., :28, :28]), model_30(images).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_other_sizes_resample_as_timm_not_as_transformers(siglip):
    """Other image sizes: flexvlm resamples the position embeddings as timm does (bicubic with
    antialias, PIL's kernel, which differs from plain bicubic even upsampling): the tokens of a
    transformers tower built for that size with those embeddings. transformers' own
    interpolate_pos_encoding (plain bicubic) gives other tokens."""
    model, state, config = siglip
    backbone = _loaded(config, state, "", layer=-2)
    large = SiglipVisionModel(SiglipVisionConfig(**{**SHAPE, "image_size": 42}, layer_norm_eps=1e-5)).eval()
    weights = dict(model.state_dict())
    grid = weights["embeddings.position_embedding.weight"].T.reshape(1, 32, 4, 4)
    resampled = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    weights["embeddings.position_embedding.weight"] = resampled.reshape(32, 36).T
    large.load_state_dict(weights)
    images = _images(42, batch=1)
    with torch.no_grad():
        tokens = backbone(images)
        torch.testing.assert_close(tokens, large(images, output_hidden_states=True).hidden_states[-2],
                                   atol=1e-5, rtol=1e-5)
        interpolated = model(images, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2]
        assert not torch.allclose(tokens, interpolated, atol=1e-3)


@pytest.mark.parametrize("config_cls, tower_cls, model_type", [
    (Idefics3VisionConfig, Idefics3VisionTransformer, "idefics3_vision"),
    (SmolVLMVisionConfig, SmolVLMVisionTransformer, "smolvlm_vision"),
])
def test_idefics3_and_smolvlm_towers(config_cls, tower_cls, model_type):
    """Full-size images with a full patch_attention_mask: last_hidden_state, after post_layernorm, is
    the tower with final_norm; SmolVLM / Idefics3 checkpoints hold it as `model.vision_model.`."""
    torch.manual_seed(0)
    config = config_cls(**SHAPE)  # gelu_pytorch_tanh, eps 1e-6: the class's defaults
    tower = _perturbed(tower_cls(config))
    state = {"model.vision_model." + k: v for k, v in tower.state_dict().items()}
    state["model.connector.modality_projection.proj.weight"] = torch.zeros(8, 32 * 4)
    backbone = _loaded(config.to_dict(), state, "model.vision_model.", layer=-1, final_norm=True)
    assert backbone.model.norm.eps == 1e-6 and backbone.mean == (0.5, 0.5, 0.5)
    images = _images()
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        out = tower(images, patch_attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(backbone(images), out.last_hidden_state, atol=1e-5, rtol=1e-5)
        penultimate = _loaded(config.to_dict(), state, "model.vision_model.", layer=-2).eval()
        torch.testing.assert_close(penultimate(images), out.hidden_states[-2], atol=1e-5, rtol=1e-5)


def test_idefics3_grids_whose_positions_are_not_row_major_are_refused():
    """Idefics3 / SmolVLM bucketise float32 coordinates: for some native grids (19, 25, ...) a full
    image repeats positions. flexvlm's copy of that computation agrees with transformers' module for
    every grid up to 32, and the tower refuses those grids (the real ones, 26, 27, 32, are row-major)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    not_row_major = []
    for grid in range(1, 33):
        embeddings = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=4, image_size=grid, patch_size=1))
        seen = {}
        embeddings.position_embedding.register_forward_hook(lambda m, args, out: seen.update(ids=args[0]))
        embeddings(torch.zeros(1, 3, grid, grid), torch.ones(1, grid, grid, dtype=torch.bool))
        assert torch.equal(seen["ids"][0], _navit_positions(grid)), grid
        if not torch.equal(seen["ids"][0], torch.arange(grid * grid)):
            not_row_major.append(grid)
    assert not_row_major == [19, 25, 29, 31] and not {26, 27, 32} & set(not_row_major)
    with pytest.raises(ValueError, match="image_size 38 // patch_size 2 = 19: .* not row-major"):
        siglip_tower({**SHAPE, "model_type": "smolvlm_vision", "image_size": 38, "patch_size": 2})
    siglip_tower({**SHAPE, "model_type": "siglip_vision_model", "image_size": 38, "patch_size": 2})  # SigLIP's are


def test_round_trip_to_transformers_names(siglip):
    model, state, config = siglip
    backbone = _loaded(config, state, "", layer=-1, final_norm=True)
    back = siglip_to_hf(backbone.model.state_dict(), "vision_model.")
    tower = {"vision_model." + k: v for k, v in state.items() if not k.startswith("head.")}
    assert back.keys() == tower.keys()
    for name, tensor in back.items():
        torch.testing.assert_close(tensor, tower[name], rtol=0, atol=0)
    assert siglip_from_hf(back, "vision_model.").keys() == backbone.model.state_dict().keys()


def test_unsupported_config_values_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model", "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="num_channels 4"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model", "num_channels": 4})
    with pytest.raises(ValueError, match="model_type 'siglip2_vision_model'"):
        siglip_tower({**SHAPE, "model_type": "siglip2_vision_model"})
    with pytest.raises(ValueError, match="model_type absent: hidden_size, num_attention_heads, patch_size"):
        siglip_tower({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="image_size \\[28, 21\\]"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model", "image_size": [28, 21]})
    with pytest.raises(ValueError, match="vision feature layer 0"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model"}, layer=0)
    with pytest.raises(ValueError, match="vision feature layer \\[-2, -1\\]"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model"}, layer=[-2, -1])
    with pytest.raises(ValueError, match="final_norm with vision feature layer -2: .* \\(layer -1 or 3\\)"):
        siglip_tower({**SHAPE, "model_type": "siglip_vision_model"}, layer=-2, final_norm=True)


def test_defaults_by_model_type():
    with torch.device("meta"):
        siglip = siglip_tower({"model_type": "siglip_vision_model", "num_hidden_layers": 1})
        smolvlm = siglip_tower({"model_type": "smolvlm_vision", "num_hidden_layers": 1})
    assert (siglip.embed_dim, siglip.patch_size, siglip.model.blocks[0].attn.num_heads) == (768, 16, 12)
    assert (smolvlm.embed_dim, smolvlm.patch_size, smolvlm.model.blocks[0].attn.num_heads) == (1152, 32, 16)
    assert siglip.model.blocks[0].mlp.fc1.out_features == smolvlm.model.blocks[0].mlp.fc1.out_features == 3072


def test_intermediate_sizes_the_plain_ratio_misses():
    """timm sizes the MLP int(width * mlp_ratio): 61 / 56 * 56 is 60.99..., the tower still has 61."""
    assert int(56 * (61 / 56)) == 60
    with torch.device("meta"):
        backbone = siglip_tower({**SHAPE, "model_type": "siglip_vision_model", "hidden_size": 56,
                                 "intermediate_size": 61, "num_hidden_layers": 1})
    assert backbone.model.blocks[0].mlp.fc1.out_features == 61


def test_so400m_on_the_meta_device():
    """LLaVA-OneVision's tower (so400m, 26 blocks as OV keeps them, 384 px, patch 14): 4304 / 1152
    is the mlp ratio, 27 x 27 positions; built without memory."""
    config = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    with torch.device("meta"):
        backbone = siglip_tower(config, layer=-1, frozen=True)
    assert all(p.is_meta for p in backbone.parameters()) and not any(p.requires_grad for p in backbone.parameters())
    assert backbone.model.pos_embed.shape == (1, 729, 1152) and backbone.model.blocks[0].mlp.fc1.out_features == 4304
    assert (backbone.depth, len(backbone.model.blocks), backbone.grid_size) == (26, 26, 27)
    assert backbone(torch.empty(1, 3, 378, 378, device="meta")).shape == (1, 729, 1152)


def test_mismatched_checkpoints_are_refused_naming_the_tensor(siglip):
    _, state, config = siglip
    broken = dict(state)
    del broken["encoder.layers.0.mlp.fc2.bias"]
    broken["embeddings.position_embedding.weight"] = torch.zeros(9, 32)
    with pytest.raises(ValueError) as error:
        _loaded(config, broken, "", layer=-1)
    message = str(error.value)
    assert "missing (1):\n    blocks.0.mlp.fc2.bias (32,)" in message
    assert "pos_embed: checkpoint (1, 9, 32) vs model (1, 16, 32)" in message

    no_q = {k: v for k, v in state.items() if k != "encoder.layers.2.self_attn.q_proj.weight"}
    with pytest.raises(ValueError, match="(?s)missing.*blocks.2.attn.qkv.weight.*unexpected.*k_proj.weight"):
        _loaded(config, no_q, "", layer=-1)

    # what the tower drops after its layer is checked too: the last block, post_layernorm
    no_last = {k: v for k, v in state.items() if not k.startswith(("encoder.layers.2.", "post_layernorm."))}
    with pytest.raises(ValueError, match="(?s)3-block SigLIP tower.*blocks.2.norm1.weight.*norm.bias"):
        _loaded(config, no_last, "", layer=-2)
    # a deeper checkpoint than the config: its extra blocks are unexpected
    deeper = {**state, **{k.replace("layers.2.", "layers.3."): v for k, v in state.items() if ".layers.2." in k}}
    with pytest.raises(ValueError, match="unexpected.*\n    blocks.3."):
        _loaded(config, deeper, "", layer=-1)
    with pytest.raises(ValueError, match="no tensors under the prefix 'vision_tower.'.*'vision_model.embeddings.'"):
        _loaded(config, {"vision_model." + k: v for k, v in state.items()}, "vision_tower.", layer=-2)


TIMM_KW = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)


def test_timm_backbone_final_norm_is_forward_features_after_the_last_block():
    """TimmBackbone(final_norm=True): the last block's patch tokens after the model's final norm, i.e.
    timm's forward_features without the prefix tokens, at any size; refused for another layer, and
    for a model whose final norm comes after its pooling (fc_norm); built on the meta device too."""
    torch.manual_seed(0)
    backbone = _perturbed(TimmBackbone("vit_tiny_patch16_224", layer=-1, model_kwargs=TIMM_KW, final_norm=True))
    assert isinstance(backbone.model.norm, torch.nn.LayerNorm) and backbone.depth == 3
    for size in [(32, 32), (48, 24)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = backbone.model.forward_features(images)[:, backbone.model.num_prefix_tokens:]
            torch.testing.assert_close(backbone(images), expected)
            plain = TimmBackbone("vit_tiny_patch16_224", layer=2, model_kwargs=TIMM_KW).eval()
            plain.load_state_dict({k: v for k, v in backbone.state_dict().items() if not k.startswith("model.norm.")})
            assert not torch.allclose(plain(images), expected, atol=1e-3)
            torch.testing.assert_close(backbone.model.norm(plain(images)), expected)
    with pytest.raises(ValueError, match="final_norm=True follows the last block: layer -2 is block 1 of 3"):
        TimmBackbone("vit_tiny_patch16_224", layer=-2, model_kwargs=TIMM_KW, final_norm=True)
    with pytest.raises(ValueError, match="no final norm before its pooling"):
        TimmBackbone("vit_tiny_patch16_224", layer=-1, model_kwargs={**TIMM_KW, "global_pool": "avg"}, final_norm=True)
    with torch.device("meta"):
        meta = TimmBackbone("vit_tiny_patch16_224", layer=2, model_kwargs=TIMM_KW, final_norm=True)
    assert all(p.is_meta for p in meta.parameters()) and isinstance(meta.model.norm, torch.nn.LayerNorm)
    assert meta(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 16, 48)
