"""Every YAML under configs/ and experiments/ parses, stacked as it is run; every paper YAML's model
builds on the meta device (no weights read, no memory), with the parameter count of the published
models it is made of, computed here independently of flexvlm's modules."""

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
# not LightningCLI configs: lmms-eval task files (with `!function` tags) and the protocol runner's files
NOT_CLI = [ROOT / "configs" / "lmms_eval", *(ROOT / "experiments" / "synthetic" / "protocol" / f"{name}.yaml"
                                            for name in ("protocol", "axes"))]


def cli_stack(path: Path) -> tuple[str, list[Path]]:
    """The subcommand and the configs a YAML is run with (as its comments and READMEs say), itself last."""
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith("configs/benchmarks/"):
        return "test", [RELEASE_TRAINING, path]
    if relative.startswith("experiments/synthetic/eval/"):  # on the training config whose checkpoint they read
        return "test", [SYNTHETIC, ROOT / "experiments" / "synthetic" / "flex_attention_ratio.yaml", path]
    if relative.startswith("experiments/synthetic/"):
        return "fit", [SYNTHETIC, path]
    if relative.startswith("experiments/paper/ablations/"):
        return "fit", [RELEASE_TRAINING, path]
    if path == RELEASED:
        return "test", [path]
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
