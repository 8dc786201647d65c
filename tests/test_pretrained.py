"""Models built from a checkpoint's own config.json (`flexvlm.architectures.from_pretrained`, `PretrainedFlexVLM` in a
YAML): the three LLaVA layouts, the authors' released FlexAttention checkpoint among them, as small
random checkpoints written in those formats. Nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_checkpoints import (  # noqa: F401 (hf and sp_folder are fixtures)
    HF_TEXT, HF_VISION, PROMPT, _backbone, _logits, _mm_projector, _randomise, _save_bin_shards, hf, sp_folder,
)

from flexvlm.architectures import PretrainedFlexVLM, from_pretrained
from flexvlm.architectures.llava15 import PretrainedWeights
from flexvlm.cli import main
from flexvlm.models.llm import LlamaConfig, llama_config_from_hf
from flexvlm.models.vlm import FlexVLM, VLMOutput
from flexvlm.selection import AttentionSelection, RandomSelection

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
RELEASED_YAML = ROOT / "experiments" / "paper" / "llava-1.5-7b-flexattn-released.yaml"
BENCHMARKS = sorted((ROOT / "configs" / "benchmarks").glob("*.yaml"))
# the released layout at a small size: enough layers for the release's 9 plain ones, an odd vocabulary,
# settings that differ from every default, so that each must be read from config.json, and a tower of
# 6 x 6 tokens, so that the release's 9 x 9 blocks of the 18 x 18 high-res grid hold 2 x 2 tokens each
RELEASE_TEXT = {**HF_TEXT, "vocab_size": 131, "num_hidden_layers": 11, "max_position_embeddings": 96}
RELEASE_ROPE_THETA = 500000.0
RELEASE_IMAGE = 84
RELEASE_EXTRA = {"zoom_ratio": "3", "lowres_size": "84", "highres_size": "252", "threshold": "40", "warmup": "10"}


def _released_config(extra: dict) -> dict:
    """config.json as the release writes it (transformers 4.37 keys, LLaVA's mm_* keys, `extra`)."""
    return {
        **RELEASE_TEXT, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_act": "silu",
        "rope_theta": RELEASE_ROPE_THETA, "rope_scaling": None, "tie_word_embeddings": False,
        "mm_vision_tower": "clip-vit",  # a local folder beside the weights, relative to the checkpoint
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 32, "image_aspect_ratio": "pad", "extra": extra,
    }


def _write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def release(hf, tmp_path_factory):
    """A random checkpoint in the released format: LLaMA names plus `model.mm_projector.*` plus
    `self_attn.{k,v}_proj_hd` in every layer, .bin shards, its CLIP tower in a local folder."""
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**RELEASE_TEXT)).eval()
    _randomise(llama)
    state = {**llama.state_dict(), **_mm_projector(hf["llava"])}
    torch.manual_seed(3)
    for i in range(RELEASE_TEXT["num_hidden_layers"]):
        for which in "kv":
            weight = state[f"model.layers.{i}.self_attn.{which}_proj.weight"]
            state[f"model.layers.{i}.self_attn.{which}_proj_hd.weight"] = torch.randn_like(weight) / 8
    root = tmp_path_factory.mktemp("released")
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**HF_VISION, "image_size": RELEASE_IMAGE}))
    _randomise(clip)
    clip.save_pretrained(root / "clip")
    folder = root / "llava-v1.5-7b-flexattn"
    _save_bin_shards(state, folder)
    _write_config(folder, _released_config(RELEASE_EXTRA))
    shutil.copytree(root / "clip", folder / "clip-vit")
    return dict(folder=folder, state=state, clip=root / "clip")


def _variant(release, tmp_path: Path, **extra) -> Path:
    """The released folder with other `extra` settings (the same weights)."""
    folder = tmp_path / "variant"
    shutil.copytree(release["folder"], folder)
    _write_config(folder, _released_config({**RELEASE_EXTRA, **extra}))
    return folder


def _forward(model: FlexVLM) -> VLMOutput:
    """A wide image padded top and bottom: content rows 0.4 .. 0.6 of the square, so that high-res
    rows 7 .. 10 of 18 are the image and the 2 x 2 blocks of rows 6 - 7 and 10 - 11 straddle the
    border (low-res rows 2 and 3 of 6 are the image: the blocks above them can be selected)."""
    torch.manual_seed(4)
    image, box = torch.randn(1, 3, 3 * RELEASE_IMAGE, 3 * RELEASE_IMAGE), torch.tensor([[0.4, 0.0, 0.6, 1.0]])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), image, box)


# ---------------------------------------------------------------- the released checkpoint


def test_released_checkpoint_settings_land_where_they_should(release):
    model = from_pretrained(str(release["folder"])).eval()
    config = model.config
    assert (config.vocab_size, config.num_layers, config.hidden_size, config.intermediate_size) == (131, 11, 32, 64)
    assert (config.num_heads, config.kv_heads, config.rms_norm_eps) == (4, 2, 1e-5)
    assert (config.rope_theta, config.max_position_embeddings) == (RELEASE_ROPE_THETA, 96)
    assert model.mode == "flex" and model.num_sa_layers == 9 and model.flex_layers == [9, 10]
    assert model.encoder.zoom == 3 and model.image_size == 3 * RELEASE_IMAGE
    selection = model.selection
    assert type(selection) is AttentionSelection
    assert (selection.threshold, selection.block_grid, selection.whole_blocks) == (40, 9, True)
    assert model.margin_rule == "release"
    assert model.encoder.backbone.frozen and model.encoder.backbone.block_index == 1  # layer -2 of 3 blocks
    for i in model.flex_layers:
        attn = model.llm.layers[i].self_attn
        for which in "kv":
            released = release["state"][f"model.layers.{i}.self_attn.{which}_proj_hd.weight"]
            assert torch.equal(getattr(attn, f"{which}_hr_proj").weight, released)


def _by_hand(release, whole_blocks: bool, margin_rule: str = "release") -> FlexVLM:
    """The released weights in a model whose every setting is written out: the loaders of
    tests/test_checkpoints.py, the release's N_SA, zoom, threshold rule on 9 x 9 blocks and margin."""
    return FlexVLM(
        _backbone(image=RELEASE_IMAGE), llm="tiny", mode="flex", num_sa_layers=9, zoom=3,
        llm_overrides=dict(vocab_size=131, hidden_size=32, intermediate_size=64, num_layers=11, num_heads=4,
                           num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=RELEASE_ROPE_THETA,
                           max_position_embeddings=96),
        selection=AttentionSelection(threshold=40, block_grid=9, whole_blocks=whole_blocks),
        pretrained=PretrainedWeights(llava=str(release["folder"]), vision=str(release["clip"])),
        margin_rule=margin_rule,
    ).eval()


def test_released_checkpoint_logits_match_the_model_built_by_hand(release):
    expected = _forward(_by_hand(release, whole_blocks=True))
    assert expected.logits.std() > 0.1
    out = _forward(from_pretrained(str(release["folder"])).eval())
    assert (out.logits - expected.logits).abs().max() < 1e-4
    # straddling blocks are selected whole, padding rows 6 or 11 included; the default rule cuts them off
    whole, cut = out.selection_masks[9][0, 0], _forward(_by_hand(release, whole_blocks=False))
    assert whole[[6, 11]].any() and not whole[:6].any() and not whole[12:].any()
    image_rows = (torch.arange(18) >= 7) & (torch.arange(18) <= 10)
    assert torch.equal(cut.selection_masks[9][0, 0], whole & image_rows[:, None])
    assert (cut.logits - expected.logits).abs().max() > 1e-3
    # fractions of what each rule can select: every token of the square, or the image's 4 x 18 rows
    assert torch.isclose(out.selected_fraction[9], whole.sum() / whole.numel())
    assert torch.isclose(cut.selected_fraction[9], cut.selection_masks[9][0, 0].sum() / (4 * 18))


def test_released_random_ablation_and_overrides(release, tmp_path):
    model = from_pretrained(str(_variant(release, tmp_path, special="random")), pretrained=None)
    selection = model.selection
    assert type(selection) is RandomSelection and selection.whole_blocks
    assert (selection.budget.ratio, selection.block_grid) == (0.1, 8)  # the release: Bernoulli(0.1) on 8 x 8 blocks
    chosen = from_pretrained(str(release["folder"]), pretrained=None, num_sa_layers=4, zoom=1,
                                     selection="center", llm_overrides={"max_position_embeddings": 64})
    assert chosen.num_sa_layers == 4 and chosen.encoder.zoom == 1 and chosen.selection.whole_blocks is False
    assert chosen.config.max_position_embeddings == 64 and chosen.config.vocab_size == 131


@pytest.mark.parametrize("key,value", [("threshold", "high"), ("zoom_ratio", "3x"), ("lowres_size", "")])
def test_unreadable_extra_values_are_named(release, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"extra '{key}' = '{value}' is not an integer"):
        from_pretrained(str(_variant(release, tmp_path, **{key: value})), pretrained=None)


def test_extra_sizes_that_contradict_the_tower(release, tmp_path):
    with pytest.raises(ValueError, match="lowres_size 336: .* native size, 84"):
        from_pretrained(str(_variant(release, tmp_path, lowres_size="336")), pretrained=None)


def test_missing_folder_config_and_tower(release, hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found: .*nowhere"):
        from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        from_pretrained(str(tmp_path))
    # the original layout names a hub tower: it must be given as a local folder
    with pytest.raises(ValueError, match="'openai/clip-vit-large-patch14-336' .*mm_vision_tower.* not a local folder"):
        from_pretrained(str(hf["root"] / "llava-original"))


# ---------------------------------------------------------------- the YAML path


def test_released_yaml_builds_the_same_model(release, sp_folder, tmp_path, monkeypatch):
    """The shipped YAML with its /path/to/ placeholders pointed at the small checkpoint, stacked with
    a benchmark config, built (not run) by the command line."""
    monkeypatch.setattr("sys.argv", ["flexvlm"])
    cli = main([
        "--config", str(RELEASED_YAML), "--config", str(ROOT / "configs" / "benchmarks" / "textvqa.yaml"),
        "--model.model.init_args.checkpoint", str(release["folder"]),
        "--model.model.init_args.vision", str(release["clip"]),
        "--data.init_args.tokenizer_path", str(sp_folder),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
    ], run=False)
    model = cli.model.model
    assert isinstance(model, PretrainedFlexVLM)
    assert model.num_sa_layers == 9 and model.encoder.zoom == 3 and model.selection.whole_blocks
    reference = from_pretrained(str(release["folder"])).state_dict()
    got = model.state_dict()
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


@pytest.mark.parametrize("benchmark", BENCHMARKS, ids=lambda p: p.stem)
def test_released_yaml_stacks_with_each_benchmark(benchmark, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["flexvlm"])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(RELEASED_YAML), "--config", str(benchmark), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]["class_path"] == "flexvlm.architectures.PretrainedFlexVLM"
    reader = yaml.safe_load(benchmark.read_text())["data"]["init_args"]["benchmark"]["class_path"]
    assert printed["data"]["init_args"]["benchmark"]["class_path"] == reader


# ---------------------------------------------------------------- the other LLaVA layouts


def test_llava_hf_layout_builds_from_its_config(hf):
    """Vocabulary, sizes and the tower from `text_config` / `vision_config`; the logits are transformers'."""
    model = from_pretrained(str(hf["root"] / "llava-hf"), mode="lr_only", zoom=1).eval()
    assert model.config.vocab_size == HF_TEXT["vocab_size"] and model.config.kv_heads == 2
    assert (_logits(model, hf["image"]) - hf["logits"]).abs().max() < 1e-4


def test_original_layout_builds_from_its_config(hf):
    model = from_pretrained(str(hf["root"] / "llava-original"), vision=str(hf["root"] / "clip"),
                                    mode="lr_only", zoom=1).eval()
    assert model.config.vocab_size == HF_TEXT["vocab_size"]
    assert (_logits(model, hf["image"]) - hf["logits"]).abs().max() < 1e-4


def test_checkpoint_without_extra_gets_the_default_flex_model(hf):
    model = from_pretrained(str(hf["root"] / "llava-hf"), pretrained=None)
    assert model.mode == "flex" and model.num_sa_layers == 1 and model.encoder.zoom == 3  # FlexVLM's defaults
    assert type(model.selection) is AttentionSelection and not model.selection.whole_blocks
    assert model.margin_rule == "centre"


def test_partial_text_config_takes_transformers_defaults():
    """llava-hf/llava-1.5-7b-hf's `text_config` names only what differs from transformers' LlamaConfig."""
    hub = {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
    assert llama_config_from_hf(hub) == LlamaConfig.from_name("vicuna-7b-v1.5", vocab_size=32064)
