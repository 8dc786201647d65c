"""Real checkpoint layouts, written by `transformers` / open_clip at tiny sizes, loaded by flexvlm
and checked against the reference forward passes. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import sentencepiece
import torch
import yaml
from safetensors.torch import save_file
from test_data_tokenizer import llava_tokenizer_image_token
from test_llm import SMALL, transformers_pair
from test_llm import randomise as _randomise

from flexvlm.architectures import from_pretrained
from flexvlm.architectures.llava15 import PretrainedWeights, load_llava, load_projector
from flexvlm.models.clip import load_clip_vision
from flexvlm.models.families import decoder_config_from_hf, load_llm_weights
from flexvlm.weights import read_checkpoint
from flexvlm.cli import main
from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from flexvlm.models.decoder import KVCache
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.qwen2 import Qwen2
from flexvlm.models.vision import OpenClipBackbone
from flexvlm.models.vlm import FlexVLM

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
IMAGE, PATCH, IMAGE_TOKEN = 42, 14, 99  # a 3 x 3 grid of 9 image tokens
HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=IMAGE, patch_size=PATCH)
HF_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
LLM = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
           rms_norm_eps=1e-5, max_position_embeddings=128)
OPEN_CLIP = dict(embed_dim=16, text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                 vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=32, layers=3, head_width=16, mlp_ratio=2.0))
PROMPT = [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]


def _backbone(layer: int = -2, quick_gelu: bool = True, image: int = IMAGE) -> OpenClipBackbone:
    vision = {**OPEN_CLIP["vision_cfg"], "image_size": image}
    return OpenClipBackbone("ViT-B-16", layer=layer,
                            model_kwargs={**OPEN_CLIP, "vision_cfg": vision, "force_quick_gelu": quick_gelu})


def _vlm(mode: str = "lr_only", pretrained: PretrainedWeights | None = None) -> FlexVLM:
    return FlexVLM(_backbone(), llm="tiny", llm_overrides=LLM, mode=mode, num_sa_layers=1, zoom=1,
                   pretrained=pretrained).eval()


def _save_bin_shards(state: dict, folder: Path, num_shards: int = 3) -> None:
    """`pytorch_model-0000i-of-0000n.bin` + index, as older transformers (and LLaVA-1.5) wrote them."""
    folder.mkdir(parents=True, exist_ok=True)
    names, weight_map = sorted(state), {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {n: state[n].clone() for n in names[i::num_shards]}
        torch.save(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _mm_projector(llava) -> dict:
    """The projector of a llava-hf model under the original LLaVA names."""
    mm = llava.model.multi_modal_projector
    return {f"model.mm_projector.{i}.{k}": v for i, linear in ((0, mm.linear_1), (2, mm.linear_2))
            for k, v in linear.state_dict().items()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random LlavaForConditionalGeneration saved in its own layout, and the same weights as the
    original LLaVA layout (LLaMA + mm_projector, .bin shards), a LLaMA folder and a CLIP folder."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**HF_VISION), text_config=transformers.LlamaConfig(**HF_TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    _randomise(llava)
    root = tmp_path_factory.mktemp("checkpoints")
    llava.save_pretrained(root / "llava-hf")
    llava.model.vision_tower.save_pretrained(root / "clip")

    llama = transformers.LlamaForCausalLM(config.text_config).eval()
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.save_pretrained(root / "llama")
    _save_bin_shards(llama.state_dict(), root / "llama-bin")
    (root / "llama-bin" / "config.json").write_text((root / "llama" / "config.json").read_text())

    _save_bin_shards({**llama.state_dict(), **_mm_projector(llava)}, root / "llava-original")
    (root / "llava-original" / "config.json").write_text(json.dumps({
        **config.text_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
    }))

    torch.manual_seed(1)
    image = torch.randn(1, 3, IMAGE, IMAGE)
    return dict(root=root, llava=llava, llama=llama, image=image, logits=_llava_logits(llava, image))


def _llava_logits(llava, image: torch.Tensor) -> torch.Tensor:
    """transformers' LLaVA on PROMPT, which wants the image token once per image patch token."""
    at = PROMPT.index(IMAGE_TOKEN_INDEX)
    hf_ids = PROMPT[:at] + [IMAGE_TOKEN] * (IMAGE // PATCH) ** 2 + PROMPT[at + 1:]
    with torch.no_grad():
        return llava(input_ids=torch.tensor([hf_ids]), pixel_values=image).logits


def _logits(model: FlexVLM, image: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), image).logits


# ---------------------------------------------------------------- LLaVA-1.5, both layouts


def test_llava_hf_logits_match_transformers(hf):
    assert hf["logits"].std() > 0.1  # the weights are big enough for a wrong one to show
    model = _vlm(pretrained=PretrainedWeights(llava=str(hf["root"] / "llava-hf")))
    got = _logits(model, hf["image"])
    assert got.shape == hf["logits"].shape
    assert (got - hf["logits"]).abs().max() < 1e-4


def test_original_llava_layout_with_separate_tower_matches(hf):
    root = hf["root"]
    model = _vlm(pretrained=PretrainedWeights(llava=str(root / "llava-original"), vision=str(root / "clip")))
    assert (_logits(model, hf["image"]) - hf["logits"]).abs().max() < 1e-4


def test_separate_parts_match_the_whole(hf):
    """LLaMA folder + CLIP folder + a stand-alone projector file (the pre-training stage's output)."""
    root = hf["root"]
    torch.save(_mm_projector(hf["llava"]), root / "mm_projector.bin")
    weights = PretrainedWeights(llm=str(root / "llama-bin"), vision=str(root / "clip"),
                                projector=str(root / "mm_projector.bin"))
    assert (_logits(_vlm(pretrained=weights), hf["image"]) - hf["logits"]).abs().max() < 1e-4


def test_flex_mode_high_res_projections_copy_the_loaded_ones(hf):
    model = _vlm(mode="flex", pretrained=PretrainedWeights(llava=str(hf["root"] / "llava-hf")))
    reference = hf["llava"].model.language_model.layers
    assert model.flex_layers == [1, 2]
    for i in model.flex_layers:
        attn = model.llm.layers[i].self_attn
        assert torch.equal(attn.k_proj.weight, reference[i].self_attn.k_proj.weight)
        assert torch.equal(attn.k_hr_proj.weight, attn.k_proj.weight)
        assert torch.equal(attn.v_hr_proj.weight, attn.v_proj.weight)


def test_released_flexattn_layout_loads_its_high_res_projections(hf, tmp_path):
    """The authors' checkpoint: the original LLaVA layout plus W_K' / W_V' as `self_attn.{k,v}_proj_hd`
    in every layer (used from N_SA on), its settings as strings in config.json's `extra`."""
    root = hf["root"]
    state = {**hf["llama"].state_dict(), **_mm_projector(hf["llava"])}
    torch.manual_seed(2)
    for i in range(LLM["num_layers"]):
        for which in "kv":
            weight = state[f"model.layers.{i}.self_attn.{which}_proj.weight"]
            state[f"model.layers.{i}.self_attn.{which}_proj_hd.weight"] = torch.randn_like(weight) / 8
    folder = tmp_path / "llava-flexattn"
    _save_bin_shards(state, folder)
    config = json.loads((root / "llava-original" / "config.json").read_text())
    config["extra"] = {"zoom_ratio": "1", "lowres_size": str(IMAGE), "highres_size": str(IMAGE), "threshold": "48"}
    (folder / "config.json").write_text(json.dumps(config))

    model = _vlm(mode="flex", pretrained=PretrainedWeights(llava=str(folder), vision=str(root / "clip")))
    # the same model built by hand: the LLaVA weights, then W_K' / W_V' set from the checkpoint
    by_hand = _vlm(mode="flex", pretrained=PretrainedWeights(llava=str(root / "llava-original"), vision=str(root / "clip")))
    with_copies = _logits(by_hand, hf["image"])  # W_K' = W_K, W_V' = W_V: what a plain LLaVA starts from
    with torch.no_grad():
        for i in by_hand.flex_layers:
            attn = by_hand.llm.layers[i].self_attn
            attn.k_hr_proj.weight.copy_(state[f"model.layers.{i}.self_attn.k_proj_hd.weight"])
            attn.v_hr_proj.weight.copy_(state[f"model.layers.{i}.self_attn.v_proj_hd.weight"])
    for i in model.flex_layers:
        assert torch.equal(model.llm.layers[i].self_attn.k_hr_proj.weight, state[f"model.layers.{i}.self_attn.k_proj_hd.weight"])
    loaded = _logits(model, hf["image"])
    assert (loaded - _logits(by_hand, hf["image"])).abs().max() < 1e-4
    assert (loaded - with_copies).abs().max() > 1e-3  # the released W_K', W_V' are used, not copies


# ---------------------------------------------------------------- LLaMA alone


@pytest.mark.parametrize("folder", ["llama", "llama-bin"], ids=["safetensors", "bin-shards"])
def test_llama_folder_logits_match_transformers(hf, folder):
    llm = Llama(LlamaConfig(**LLM)).eval()
    load_llm_weights(llm, hf["root"] / folder)
    ids = torch.randint(0, LLM["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = hf["llama"](ids).logits
        got = llm.logits(llm(llm.embed(ids)))
    assert (got - expected).abs().max() < 1e-4


def test_tied_embeddings_saved_once(tmp_path):
    config = transformers.LlamaConfig(**HF_TEXT, tie_word_embeddings=True)
    reference = transformers.LlamaForCausalLM(config).eval()
    _randomise(reference)
    reference.save_pretrained(tmp_path)
    assert "lm_head.weight" not in read_checkpoint(tmp_path)
    llm = Llama(LlamaConfig(**LLM, tie_word_embeddings=True)).eval()
    load_llm_weights(llm, tmp_path)
    ids = torch.randint(0, LLM["vocab_size"], (1, 6))
    with torch.no_grad():
        assert (llm.logits(llm(llm.embed(ids))) - reference(ids).logits).abs().max() < 1e-4


# ---------------------------------------------------------------- other decoder families


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_family_folder_builds_and_loads_with_transformers_logits(family, tmp_path):
    """A folder written by transformers' save_pretrained: the family and config read from its
    config.json, the weights loaded, the logits transformers', with and without the KV cache."""
    reference_decoder, ref = transformers_pair(family, tie=family == "gemma")
    ref.save_pretrained(tmp_path)
    family_class, config = decoder_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert family_class is type(reference_decoder) and config == reference_decoder.config
    llm = family_class(config).eval()
    load_llm_weights(llm, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    with torch.no_grad():
        expected = ref(ids).logits
        whole = llm.logits(llm(llm.embed(ids)))
        cache = KVCache()
        steps = [llm.logits(llm(llm.embed(ids[:, :4]), cache=cache))]  # a prefill, then token by token
        steps += [llm.logits(llm(llm.embed(ids[:, t : t + 1]), cache=cache)) for t in range(4, 7)]
    assert (whole - expected).abs().max() < 1e-4
    assert (torch.cat(steps, dim=1) - expected).abs().max() < 1e-4


def test_llava_with_a_qwen2_decoder_from_its_config(hf, tmp_path):
    """llava-hf's layout around Qwen2: `text_config.model_type` picks the family; the logits are
    transformers'; in flex mode W_K', W_V' start as W_K, W_V, biases included."""
    text = transformers.Qwen2Config(**HF_TEXT, use_sliding_window=False, rope_theta=5000.0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**HF_VISION), text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    _randomise(llava)
    llava.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path), mode="lr_only", zoom=1).eval()
    assert type(model.llm) is Qwen2 and model.config.attention_bias and model.config.rope_theta == 5000.0
    assert (_logits(model, hf["image"]) - _llava_logits(llava, hf["image"])).abs().max() < 1e-4

    flex = from_pretrained(str(tmp_path), num_sa_layers=1, zoom=1)
    reference = llava.model.language_model.layers
    for i in flex.flex_layers:
        attn = flex.llm.layers[i].self_attn
        for which in "kv":
            loaded = getattr(reference[i].self_attn, f"{which}_proj")
            high_res = getattr(attn, f"{which}_hr_proj")
            assert torch.equal(high_res.weight, loaded.weight) and torch.equal(high_res.bias, loaded.bias)


def test_family_mismatches_are_refused(hf, tmp_path):
    _, gemma = transformers_pair("gemma", tie=True)
    gemma.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gemma': the model's decoder is Llama"):
        load_llm_weights(Llama(LlamaConfig(**LLM)), tmp_path)
    qwen2 = transformers.Qwen2Config(**HF_TEXT).to_dict()
    with pytest.raises(ValueError, match="use_sliding_window: the decoder implements full attention only"):
        decoder_config_from_hf({**qwen2, "use_sliding_window": True})
    with pytest.raises(ValueError, match="model_type 'mamba' is no decoder family flexvlm implements"):
        decoder_config_from_hf({"model_type": "mamba"})
    assert decoder_config_from_hf({**qwen2, "use_sliding_window": False})[0] is Qwen2


# ---------------------------------------------------------------- CLIP vision tower


def _hf_tokens(hf, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf["llava"].model.vision_tower(pixel_values=image, output_hidden_states=True).hidden_states[-2][:, 1:]


def test_hf_clip_vision_model_through_the_adapter(hf):
    backbone = _backbone().eval()
    load_clip_vision(backbone, hf["root"] / "clip")
    with torch.no_grad():
        got = backbone(hf["image"])
    assert (got - _hf_tokens(hf, hf["image"])).abs().max() < 1e-5


def test_hf_clip_model_folder_with_text_tower(hf, tmp_path):
    """openai/clip-vit-large-patch14-336 is a whole CLIPModel: `vision_model.*` beside the text tower."""
    text = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=HF_VISION,
                                                          projection_dim=8))
    clip.vision_model.load_state_dict(hf["llava"].model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path)
    backbone = _backbone().eval()
    load_clip_vision(backbone, tmp_path)
    with torch.no_grad():
        assert (backbone(hf["image"]) - _hf_tokens(hf, hf["image"])).abs().max() < 1e-5


@pytest.mark.parametrize("which", ["whole_model", "tower_only"])
def test_open_clip_state_dict_file(tmp_path, which):
    """OpenAI / open_clip state dicts go in as they are (whole model or its `visual` part)."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True, **OPEN_CLIP).eval()
    state = reference.state_dict() if which == "whole_model" else reference.visual.state_dict()
    file = tmp_path / ("open_clip.pt" if which == "whole_model" else "visual.safetensors")
    if which == "whole_model":
        torch.save(state, file)
    else:
        save_file(state, file)
    backbone = _backbone().eval()
    load_clip_vision(backbone, file)
    image = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = reference.visual.forward_intermediates(image, indices=[-2], intermediates_only=True, output_fmt="NLC")
        (expected,) = out["image_intermediates"]
        assert torch.allclose(backbone(image), expected, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_missing_and_mis_shaped_tensors_are_listed(hf, tmp_path):
    state = dict(hf["llama"].state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\):\s+model\.layers\.1\.mlp\.up_proj\.weight \(64, 32\)"):
        load_llm_weights(Llama(LlamaConfig(**LLM)), tmp_path)
    narrow = Llama(LlamaConfig(**{**LLM, "intermediate_size": 48}))
    mis_shaped = r"model\.layers\.0\.mlp\.up_proj\.weight: checkpoint \(64, 32\) vs model \(48, 32\)"
    with pytest.raises(ValueError, match=mis_shaped):
        load_llm_weights(narrow, hf["root"] / "llama")


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PretrainedWeights(llava=str(tmp_path / "nowhere")).apply(_vlm())
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_llm_weights(Llama(LlamaConfig(**LLM)), tmp_path)


def test_config_mismatches_that_no_shape_shows(hf):
    root = hf["root"]
    with pytest.raises(ValueError, match=r"rms_norm_eps: checkpoint 1e-05 vs model 1e-06"):
        load_llm_weights(Llama(LlamaConfig(**{**LLM, "rms_norm_eps": 1e-6})), root / "llama")
    with pytest.raises(ValueError, match="quick_gelu"):
        load_clip_vision(_backbone(quick_gelu=False), root / "clip")
    model = _vlm()
    model.encoder.backbone = _backbone(layer=-1)
    with pytest.raises(ValueError, match="layer -2 of a 3-block tower is block 1, the backbone returns block 2"):
        load_llava(model, root / "llava-hf")


def test_layout_errors(hf, tmp_path):
    root = hf["root"]
    state = read_checkpoint(root / "llava-hf")
    save_file({**state, "image_newline": torch.zeros(32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no known part:\s+unclaimed \(1\):\s+image_newline \(32,\)"):
        load_llava(_vlm(), tmp_path)
    with pytest.raises(ValueError, match="holds no vision tower.*clip-vit-large-patch14-336"):
        load_llava(_vlm(), root / "llava-original")
    with pytest.raises(ValueError, match="not a LLaVA checkpoint"):
        load_llava(_vlm(), root / "llama")
    with pytest.raises(ValueError, match="not both"):
        PretrainedWeights(llava=str(root / "llava-hf"), llm=str(root / "llama"))
    with pytest.raises(ValueError, match=r"unexpected \(4\):\s+model\.mm_projector"):
        load_llm_weights(Llama(LlamaConfig(**LLM)), root / "llava-original")
    with pytest.raises(ValueError, match="missing"):
        load_projector(_vlm().projector, root / "llama" / "model.safetensors")


# ---------------------------------------------------------------- the paper's config


def test_paper_config_parses_without_building_the_model(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["flexvlm"])  # the CLI gets its arguments from `args` alone
    config = ROOT / "experiments" / "paper" / "llava-1.5-7b-flexattn.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["model"]["init_args"]
    assert model["llm"] == "vicuna-7b-v1.5" and model["zoom"] == 3 and model["num_sa_layers"] == 9
    assert model["selection"]["init_args"]["threshold"] == 48 and model["selection"]["init_args"]["block_grid"] == 9
    assert model["backbone"]["init_args"]["model_name"] == "ViT-L-14-336-quickgelu"
    assert model["pretrained"]["class_path"] == "flexvlm.architectures.llava15.PretrainedWeights"
    assert printed["trainer"]["strategy"] == "deepspeed_stage_3"


# ---------------------------------------------------------------- tokenizer folders

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "What is the colour of the sky? It is blue, and the grass is green.",
    "Describe the image in detail. There are two cats on a red sofa.",
] * 10
TEXTS = [
    "What is the colour of the sky?",
    "  two cats</s>on a sofa",  # leading spaces, a special token inside the text
    "cats </s> <s>on<unk>",
    "Zebra! unseen wörds 123 🙂",  # byte fallback, split digits
    "\nline two\n",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    """A LLaMA-like sentencepiece model (BPE, byte fallback, <unk>=0 <s>=1 </s>=2), trained here."""
    folder = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def _slow_llama_tokenizer(folder: Path):
    """transformers' sentencepiece ("slow") tokenizer in legacy mode, the LlamaTokenizer LLaVA-1.5
    trained with; transformers 5 keeps it as the generic sentencepiece backend."""
    backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    return backend.SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", special_tokens_pattern="bos")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_tokenizer_matches_slow_llama_tokenizer(sp_folder, text):
    reference = _slow_llama_tokenizer(sp_folder)
    tok = load_tokenizer(sp_folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(text) == reference(text, add_special_tokens=False).input_ids


def test_sentencepiece_special_ids(sp_folder, tmp_path):
    reference = _slow_llama_tokenizer(sp_folder)
    tok = SentencePieceTokenizer(sp_folder / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.pad_id == reference.unk_token_id  # no pad token: LLaVA pads with unk
    assert tok.vocab_size == len(reference)
    shutil.copy(sp_folder / "tokenizer.model", tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "</s>"}}))
    assert SentencePieceTokenizer(tmp_path).pad_id == reference.eos_token_id
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(ValueError, match="<bos>"):
        SentencePieceTokenizer(tmp_path)


@pytest.mark.parametrize("prompt", ["<image>\nWhat is the colour of the sky?", "Describe<image>the image", "no image"])
def test_sentencepiece_image_placeholder_matches_llava(sp_folder, prompt):
    reference = _slow_llama_tokenizer(sp_folder)
    tok = load_tokenizer(sp_folder)
    # LLaVA's function keeps the BOS that the tokenizer adds; ours adds none
    assert [tok.bos_id] + tok.encode(prompt) == llava_tokenizer_image_token(prompt, reference)


def test_sentencepiece_offsets_and_decode(sp_folder):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    tok = load_tokenizer(sp_folder)
    text = "What is the sky? It is blue é🙂"
    ids, offsets = tok.encode_with_offsets(text)
    for i, (s, e) in zip(ids, offsets):
        if not sp.is_byte(i) and s < e:
            assert text[s:e] == sp.id_to_piece(i).replace("▁", " ")
    # every byte of a multi-byte character spans that character, so labels never split it
    k = text.index("é")
    assert [span for i, span in zip(ids, offsets) if sp.is_byte(i)] == [(k, k + 1)] * 2 + [(k + 1, k + 2)] * 4
    noisy = [tok.bos_id, *ids, IMAGE_TOKEN_INDEX, tok.eos_id, tok.vocab_size + 3]
    assert tok.decode(noisy) == text


def test_load_tokenizer_prefers_tokenizer_json(sp_folder, tmp_path):
    transformers.AutoTokenizer.from_pretrained(sp_folder).save_pretrained(tmp_path)
    shutil.copy(sp_folder / "tokenizer.model", tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.model"), SentencePieceTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model in .*empty"):
        load_tokenizer(tmp_path / "empty")
