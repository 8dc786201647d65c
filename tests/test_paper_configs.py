"""Every YAML under configs/ and experiments/ parses, stacked as it is run; every paper YAML's model
builds on the meta device (no weights read, no memory), with the parameter count of the published
models it is made of, computed here independently of flexvlm's modules (the other architectures' YAMLs:
from their config.json shapes, and compared with transformers' own model of the same config.json)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from flexvlm.cli import main
from flexvlm.models.gemma import Gemma, GemmaConfig
from flexvlm.models.vlm import FlexVLM

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "configs" / "synthetic.yaml"
PAPER = ROOT / "experiments" / "paper"
RELEASE_TRAINING = PAPER / "llava-1.5-7b-flexattn.yaml"
RELEASED = PAPER / "llava-1.5-7b-flexattn-released.yaml"
# the release's recipe on other architectures: each YAML's model from a published checkpoint's config.json
# (no weights) in experiments/paper/architectures/<hub name>/
ARCHITECTURE_FOLDERS = PAPER / "architectures"
ON_OTHER_ARCHITECTURES = {
    "smolvlm-256m-flexattn": "SmolVLM-256M-Instruct",
    "smolvlm-500m-flexattn": "SmolVLM-500M-Instruct",
    "smolvlm-2.2b-flexattn": "SmolVLM-Instruct",
    "llava-onevision-0.5b-flexattn": "llava-onevision-qwen2-0.5b-ov-hf",
    "llava-onevision-7b-flexattn": "llava-onevision-qwen2-7b-ov-hf",
}
# not LightningCLI configs: lmms-eval task files (with `!function` tags) and the protocol runner's files
NOT_CLI = [ROOT / "configs" / "lmms_eval", ROOT / "experiments" / "regions" / "protocol.yaml",
           *(ROOT / "experiments" / "synthetic" / "protocol" / f"{name}.yaml" for name in ("protocol", "axes",
                                                                                           "architectures"))]


def cli_stack(path: Path) -> tuple[str, list[Path]]:
    """The subcommand and the configs a YAML is run with (as its comments and READMEs say), itself last."""
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith("configs/benchmarks/"):
        return "test", [RELEASE_TRAINING, path]
    if relative.startswith("experiments/synthetic/eval/"):  # on the training config whose checkpoint they read
        return "test", [SYNTHETIC, ROOT / "experiments" / "synthetic" / "flex_attention_ratio.yaml", path]
    if relative.startswith(("experiments/synthetic/", "experiments/regions/")):
        return "fit", [SYNTHETIC, path]
    if relative.startswith("experiments/paper/ablations/"):
        return "fit", [RELEASE_TRAINING, path]
    if path == RELEASED:
        return "test", [path]
    if path.parent == PAPER and path.stem in ON_OTHER_ARCHITECTURES:  # on their own, as their headers say
        return "fit", [path]
    if path in (SYNTHETIC, RELEASE_TRAINING):
        return "fit", [path]
    raise AssertionError(f"{relative}: no rule says what this YAML stacks on; add one to cli_stack")


YAMLS = sorted(p for p in [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("experiments/**/*.yaml")]
               if not any(p == skip or skip in p.parents for skip in NOT_CLI))
PAPER_YAMLS = sorted(PAPER.glob("**/*.yaml"))


@pytest.fixture(scope="module")
def resolved() -> Callable[[Path], dict]:
    """The config LightningCLI resolves for a YAML stacked as it is run (``--print_config``), once per YAML."""
    configs: dict[Path, dict] = {}

    def resolve(path: Path) -> dict:
        if path not in configs:
            subcommand, stack = cli_stack(path)
            printed = io.StringIO()
            # the CLI gets its arguments from `args` alone
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
                patch.setattr("sys.argv", ["flexvlm"])
                with pytest.raises(SystemExit) as exit_info:
                    main([subcommand, *(a for config in stack for a in ("--config", str(config))), "--print_config"])
            assert exit_info.value.code in (0, None)
            configs[path] = yaml.safe_load(printed.getvalue())
        return configs[path]

    return resolve


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_yaml_parses(path, resolved):
    assert "model" in resolved(path)


# -- parameter counts ----------------------------------------------------------------------------------
# published totals (the checkpoints' sizes): the decoders with their untied lm_head, the towers as
# transformers' vision models (CLIPVisionModel without its projection, SiglipVisionModel with its
# attention-pooling head)
VICUNA_7B = 6_738_415_616  # LLaMA-2-7B / Vicuna-7B v1.5
VICUNA_13B = 13_015_864_320  # LLaMA-2-13B / Vicuna-13B v1.5
QWEN2_7B = 7_615_616_512  # Qwen2-7B
CLIP_L14_336 = 303_507_456  # openai/clip-vit-large-patch14-336
SIGLIP_SO400M_384 = 428_225_600  # google/siglip-so400m-patch14-384 (27 x 27 positions, as at 378 px)


def vit_block(width: int, mlp: int) -> int:
    """One pre-norm ViT block: q, k, v, out projections with bias, the MLP with bias, two LayerNorms."""
    return 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width


# what the backbone drops reading layer -2: the last block and the final norm; SigLIP also its pooling head
# (a probe, attention, LayerNorm and MLP)
CLIP_TOWER = (CLIP_L14_336 - vit_block(1024, 4096) - 2 * 1024, 1024)
SIGLIP_HEAD = 1152 + (4 * 1152 * 1152 + 4 * 1152) + 2 * 1152 + (2 * 1152 * 4304 + 4304 + 1152)
SIGLIP_TOWER = (SIGLIP_SO400M_384 - vit_block(1152, 4304) - 2 * 1152 - SIGLIP_HEAD, 1152)


def llava_flexattn(decoder: int, width: int, kv_width: int, qkv_bias: bool, fa_layers: int,
                   tower: tuple[int, int] = CLIP_TOWER) -> int:
    """Tower + mlp2x_gelu projector + decoder + W_K', W_V' (a copy of W_K, W_V) in each FA layer."""
    tower_params, tower_width = tower
    projector = tower_width * width + width + width * width + width
    high_res = fa_layers * 2 * (width * kv_width + (kv_width if qkv_bias else 0))
    return tower_params + projector + decoder + high_res


LLAVA_7B = llava_flexattn(VICUNA_7B, 4096, 4096, False, fa_layers=23)
EXPECTED = {
    "llava-1.5-7b-flexattn": LLAVA_7B,
    "llava-1.5-7b-flexattn-released": LLAVA_7B,
    "selection_random": LLAVA_7B, "selection_center": LLAVA_7B, "selection_attention_budget": LLAVA_7B,
    "threshold32": LLAVA_7B, "threshold64": LLAVA_7B, "zoom2_672px": LLAVA_7B, "zoom4_1344px": LLAVA_7B,
    "nsa4": llava_flexattn(VICUNA_7B, 4096, 4096, False, fa_layers=28),
    "nsa16": llava_flexattn(VICUNA_7B, 4096, 4096, False, fa_layers=16),
    "vicuna13b": llava_flexattn(VICUNA_13B, 5120, 5120, False, fa_layers=29),
    "qwen2_7b": llava_flexattn(QWEN2_7B, 3584, 512, True, fa_layers=20),
    "siglip_so400m": llava_flexattn(VICUNA_7B, 4096, 4096, False, fa_layers=23, tower=SIGLIP_TOWER),
}


# -- the other architectures: counts from their config.json shapes alone ----------------------------------
def architecture_config(stem: str) -> dict:
    return json.loads((ARCHITECTURE_FOLDERS / ON_OTHER_ARCHITECTURES[stem] / "config.json").read_text())


def nsa_of(text: dict) -> int:
    """The release's proportion of plain layers: 9 of 32."""
    return round(9 / 32 * text["num_hidden_layers"])


def kv_width(text: dict) -> int:
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return text["num_key_value_heads"] * head_dim


def qkv_bias(text: dict) -> bool:
    return text["model_type"] == "qwen2"  # Qwen2's q, k, v projections have biases, LLaMA's none


def decoder_params(text: dict, tied_head: bool) -> int:
    """Embeddings, L pre-norm decoder layers (attention, SwiGLU MLP, two RMSNorms), the final norm, and an
    lm_head of its own unless tied."""
    width, mlp, kv = text["hidden_size"], text["intermediate_size"], kv_width(text)
    q = text["num_attention_heads"] * (text.get("head_dim") or width // text["num_attention_heads"])
    attention = width * q + 2 * width * kv + q * width + ((q + 2 * kv) if qkv_bias(text) else 0)
    layer = attention + 3 * width * mlp + 2 * width
    return text["vocab_size"] * width * (1 if tied_head else 2) + text["num_hidden_layers"] * layer + width


def siglip_params(vision: dict, post_layernorm: bool) -> int:
    """A SigLIP vision tower: patch embedding (a biased convolution), one position per patch, every block,
    post_layernorm if kept; no pooling head."""
    width, patch = vision["hidden_size"], vision["patch_size"]
    embeddings = 3 * patch * patch * width + width + (vision["image_size"] // patch) ** 2 * width
    blocks = vision["num_hidden_layers"] * vit_block(width, vision["intermediate_size"])
    return embeddings + blocks + (2 * width if post_layernorm else 0)


def high_res_copies_params(text: dict) -> int:
    """W_K', W_V' (a copy of the layer's W_K, W_V, biases included) in each FlexAttention layer."""
    kv = kv_width(text)
    per_layer = 2 * (text["hidden_size"] * kv + (kv if qkv_bias(text) else 0))
    return (text["num_hidden_layers"] - nsa_of(text)) * per_layer


def tied(config: dict) -> bool:
    """The model's tie_word_embeddings, or its text config's (transformers 5 takes that one when the top
    level leaves it unset, as LLaVA-OneVision's config.json does)."""
    return bool(config.get("tie_word_embeddings") or config["text_config"].get("tie_word_embeddings"))


def architecture_params(config: dict, flexattn: bool = True) -> int:
    """The parameters of the model flexvlm builds of a config.json: SmolVLM / Idefics3 keeps its tower's
    every block and post_layernorm (last_hidden_state) and its connector's linear map; LLaVA-OneVision
    reads vision_feature_layer -1 (every block, before post_layernorm) and adds its 2-layer projector and
    image_newline. ``flexattn``: with the YAMLs' W_K', W_V' copies."""
    text, vision = config["text_config"], config["vision_config"]
    width = text["hidden_size"]
    if config["model_type"] == "llava_onevision":
        assert config["vision_feature_layer"] == -1 and not vision["vision_use_head"]
        visual = siglip_params(vision, post_layernorm=False)
        visual += vision["hidden_size"] * width + width + width * width + width + width  # projector, image_newline
    else:
        visual = siglip_params(vision, post_layernorm=True)
        visual += vision["hidden_size"] * config["scale_factor"] ** 2 * width  # the connector, no bias
    return visual + decoder_params(text, tied(config)) + (high_res_copies_params(text) if flexattn else 0)


EXPECTED.update({stem: architecture_params(architecture_config(stem)) for stem in ON_OTHER_ARCHITECTURES})
# the published sizes of these checkpoints, to the precision published (the hub pages' rounded counts;
# experiments/paper/architectures/README.md)
PUBLISHED_SIZES = {
    "smolvlm-256m-flexattn": (256_000_000, 1e6),  # SmolVLM-256M: 256 M
    "smolvlm-500m-flexattn": (507_000_000, 1e6),  # SmolVLM-500M: 507 M
    "smolvlm-2.2b-flexattn": (2_250_000_000, 1e7),  # SmolVLM-Instruct: 2.25 B
    "llava-onevision-0.5b-flexattn": (894_000_000, 1e6),  # llava-onevision-qwen2-0.5b-ov-hf: 894 M
    "llava-onevision-7b-flexattn": (8_030_000_000, 1e7),  # llava-onevision-qwen2-7b-ov-hf: 8.03 B
}


@pytest.mark.parametrize("stem", ON_OTHER_ARCHITECTURES)
def test_each_architecture_config_builds_the_published_model_in_transformers(stem):
    """transformers builds each config.json (on the meta device) with the published checkpoint's size, and
    with the count above once the parts flexvlm leaves out are taken off and W_K', W_V' added."""
    transformers = pytest.importorskip("transformers")
    folder = ARCHITECTURE_FOLDERS / ON_OTHER_ARCHITECTURES[stem]
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    published, precision = PUBLISHED_SIZES[stem]
    assert round(total / precision) == round(published / precision)
    # what flexvlm's tower does not keep: OneVision's post_layernorm, which layer -1 reads before
    dropped = sum(p.numel() for name, p in params.items() if "vision_tower.post_layernorm." in name)
    assert dropped == (2 * config.vision_config.hidden_size if config.model_type == "llava_onevision" else 0)
    raw = architecture_config(stem)
    assert total - dropped == architecture_params(raw, flexattn=False)
    assert total - dropped + high_res_copies_params(raw["text_config"]) == EXPECTED[stem]


@pytest.mark.parametrize("stem", ON_OTHER_ARCHITECTURES)
def test_each_architecture_yaml_keeps_the_release_proportion(stem, resolved):
    """N_SA = round(9/32 x L), the release's selection rule (threshold 48), the config.json folder of its
    architecture (the weights are a download of the same hub checkpoint)."""
    config = architecture_config(stem)
    init = resolved(PAPER / f"{stem}.yaml")["model"]["model"]["init_args"]
    assert Path(init["checkpoint"]) == (ARCHITECTURE_FOLDERS / ON_OTHER_ARCHITECTURES[stem]).relative_to(ROOT)
    assert init["mode"] == "flex" and init["num_sa_layers"] == nsa_of(config["text_config"])
    assert init["selection"]["class_path"] == "flexvlm.selection.AttentionSelection"
    assert init["selection"]["init_args"]["threshold"] == 48


def test_the_expected_counts_agree_with_the_published_sizes():
    """Without W_K', W_V' and with its whole tower, the 7B count is LLaVA-1.5-7B's 7.06 B; the SigLIP
    subtraction leaves what its 27 blocks, patch and position embeddings hold."""
    llava_1_5_7b = LLAVA_7B - 23 * 2 * 4096 * 4096 + vit_block(1024, 4096) + 2 * 1024
    assert round(llava_1_5_7b / 1e7) == 706
    patch_and_position = 3 * 14 * 14 * 1152 + 1152 + 27 * 27 * 1152
    assert SIGLIP_SO400M_384 - SIGLIP_HEAD - 2 * 1152 == 27 * vit_block(1152, 4304) + patch_and_position


@pytest.fixture(scope="module")
def released_folder(tmp_path_factory) -> Path:
    """The released checkpoint's config.json (LLaVA-1.5-7B's plus `extra`) and its tower's, without weights:
    enough to build PretrainedFlexVLM, which reads its model from them."""
    folder = tmp_path_factory.mktemp("llava-v1.5-7b-flexattn")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llava_llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False,
        "mm_vision_tower": "clip", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024,
        "extra": {"zoom_ratio": "3", "lowres_size": "336", "highres_size": "1008", "threshold": "48"},
    }))
    (folder / "clip").mkdir()
    (folder / "clip" / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }))
    return folder


def _without_weights(model: dict, released_folder: Path) -> dict:
    """The resolved model config with nothing to read: no pretrained weights nor tower checkpoint; the
    released model from the config.json files alone."""
    init = model["init_args"]
    if "checkpoint" in init:  # PretrainedFlexVLM: its weights load once materialised (FlexVLM.load_weights)
        checkpoint = ROOT / init["checkpoint"]
        if ARCHITECTURE_FOLDERS in checkpoint.parents:  # a published config.json alone, no weights in it
            return {**model, "init_args": {**init, "checkpoint": str(checkpoint)}}
        return {**model, "init_args": {**init, "checkpoint": str(released_folder), "vision": None}}
    backbone = init["backbone"]
    if "checkpoint_path" in backbone["init_args"]:
        backbone = {**backbone, "init_args": {**backbone["init_args"], "checkpoint_path": None}}
    return {**model, "init_args": {**init, "pretrained": None, "backbone": backbone}}


@pytest.fixture(scope="module")
def model_parser() -> ArgumentParser:
    parser = ArgumentParser()
    parser.add_argument("--model", type=FlexVLM)
    return parser


@pytest.mark.parametrize("path", PAPER_YAMLS, ids=lambda p: p.stem)
def test_paper_models_build_on_the_meta_device(path, resolved, model_parser, released_folder):
    config = resolved(path)
    model_config = _without_weights(config["model"]["model"], released_folder)
    with torch.device("meta"):
        model = model_parser.instantiate_classes(model_parser.parse_object({"model": model_config})).model
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[path.stem]
    data = config.get("data") or {}
    if "image_size" in data.get("init_args", {}):  # the data's images are the model's high-res size
        assert data["init_args"]["image_size"] == model.image_size


def test_a_decoder_given_by_class_path(model_parser):
    """A decoder family in a YAML as the backbone is given: class_path and init_args, its config's
    unnamed fields the family's defaults."""
    config = model_parser.parse_string("""
model:
  class_path: flexvlm.models.vlm.FlexVLM
  init_args:
    backbone: {class_path: flexvlm.models.vision.PatchMLPBackbone, init_args: {embed_dim: 16}}
    llm:
      class_path: flexvlm.models.gemma.Gemma
      init_args:
        config: {vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_layers: 2, num_heads: 2, head_size: 4}
    num_sa_layers: 1
""")
    model = model_parser.instantiate_classes(config).model
    assert type(model.llm) is Gemma and model.flex_layers == [1]
    assert model.config == GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                       head_size=4)
    assert model.config.tie_word_embeddings and model.config.rms_norm_eps == 1e-6  # Gemma's defaults
