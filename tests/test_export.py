"""``python -m flexvlm export``: a trained run written in the release's layout (or llava-hf's) loads back
with ``flexvlm.architectures.from_pretrained`` to the same logits, transformers reads what it knows of it, and what
cannot be exported or overwritten is refused with its name. Small models, CLIP-shaped towers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import _small
from test_llm import randomise

import flexvlm.__main__ as entry_point
from flexvlm.cli import main
from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import load_tokenizer
from flexvlm.architectures import PretrainedFlexVLM, from_pretrained
from flexvlm.export import export
from flexvlm.models.vlm import FlexVLM

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "synthetic.yaml")
TOWER = str(ROOT / "experiments" / "synthetic" / "towers" / "open_clip_vit.yaml")  # 32 px, 8 px patches
MODES = ROOT / "experiments" / "synthetic"
# settings that differ from every default, so that each must travel through config.json
LLM_OVERRIDES = '{"rope_theta": 5000.0, "rms_norm_eps": 1.0e-6, "num_kv_heads": 2}'
IMAGE_TOKEN = 63  # the tiny vocabulary's last id, llava-hf's image token


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A flex run of one step with the open_clip tower, its checkpoint's weights then randomised (a
    wrong tensor shows in the logits): <root>/run/v/{config.yaml, checkpoints/last.ckpt}."""
    root = tmp_path_factory.mktemp("runs")
    cli = main(["fit", "--config", BASE, "--config", TOWER, *_small(root), "--trainer.max_steps", "1",
                "--model.alpha_warmup", "0.1", "--model.model.init_args.llm_overrides", LLM_OVERRIDES])
    ckpt = root / "run" / "v" / "checkpoints" / "last.ckpt"
    with torch.no_grad():
        randomise(cli.model.model)
    saved = torch.load(ckpt, weights_only=True)
    torch.save({**saved, "state_dict": cli.model.state_dict()}, ckpt)
    return dict(ckpt=ckpt, model=cli.model.model.eval())


def _batch(image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts (one left-padded) with an image each; the answer rows select (labels)."""
    torch.manual_seed(seed)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], [0, 0, 2, IMAGE_TOKEN_INDEX, 11, 12, 13]])
    mask = (torch.arange(7) >= torch.tensor([[0], [2]])).long()
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return dict(input_ids=ids, attention_mask=mask, images=torch.randn(2, 3, image_size, image_size),
                content_box=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.0, 0.8, 1.0]]), labels=labels)


def _logits(model: FlexVLM, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def _cheap_run(tmp_path: Path, *configs: str) -> tuple[Path, FlexVLM]:
    """A checkpoint of the model of ``configs`` with random weights, without training (no config.yaml
    beside it: the export is given the configs)."""
    cli = main([arg for config in configs for arg in ("--config", config)] + _small(tmp_path), run=False)
    with torch.no_grad():
        randomise(cli.model.model)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": cli.model.state_dict(), "hyper_parameters": dict(cli.model.hparams)}, ckpt)
    return ckpt, cli.model.model


# ---------------------------------------------------------------- the release layout


def test_release_export_loads_back_to_the_same_logits(run, tmp_path):
    out = tmp_path / "llava-v1.5-flexattn-tiny"
    notes = export(run["ckpt"], out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava_llama"
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == (5000.0, 1e-6, 2)
    assert config["mm_vision_tower"] == "vision_tower" and config["mm_vision_select_layer"] == -1
    assert config["extra"] == {
        "zoom_ratio": "3", "lowres_size": "32", "highres_size": "96", "threshold": "48", "warmup": "10",
        "flexvlm": {"mode": "flex", "num_sa_layers": 1, "zoom": 3, "high_res_path": "crops", "margin_rule": "centre",
                    "selection": {"name": "attention", "settings": {"threshold": 48, "ratio": None, "top_k": None,
                                                                    "block_grid": None, "whole_blocks": False}}},
    }
    names = set(load_file(out / "model.safetensors"))
    assert {"model.layers.1.self_attn.k_proj_hd.weight", "model.layers.2.self_attn.v_proj_hd.weight",
            "model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight"} <= names
    assert not any("_hr_proj" in n or "vision" in n for n in names)
    assert "model.layers.0.self_attn.k_proj_hd.weight" not in names  # layer 0 is plain self-attention
    tower = json.loads((out / "vision_tower" / "config.json").read_text())
    assert (tower["num_hidden_layers"], tower["hidden_act"]) == (2, "gelu")  # blocks 0 .. 1 of 3: layer -2
    assert any("N_SA" in n or "num_sa_layers 9" in n for n in notes)  # the authors' code hard-codes N_SA = 9

    loaded = from_pretrained(str(out))
    batch = _batch(96)
    expected, got = run["model"](**batch), loaded.eval()(**batch)
    assert expected.logits.std() > 0.1 and expected.sample_fraction.min() > 0  # the rows did select
    assert (got.logits - expected.logits).abs().max() < 1e-5
    assert all(torch.equal(got.selection_masks[i], expected.selection_masks[i]) for i in expected.selection_masks)


def test_transformers_reads_the_release_layout_as_llama_and_clip(run, tmp_path):
    """transformers has no class for the whole release layout (LlavaLlamaForCausalLM is LLaVA's own);
    it reads its language model as LLaMA (the extra tensors left out) and its tower as CLIP."""
    export(run["ckpt"], tmp_path / "out")
    model = run["model"]
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    clip = transformers.CLIPVisionModel.from_pretrained(tmp_path / "out" / "vision_tower").eval()
    ids, images = torch.randint(0, 64, (2, 9)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = model.llm.logits(model.llm(model.llm.embed(ids)))
        assert (llama(ids).logits - text).abs().max() < 1e-5
        tokens = clip(pixel_values=images, output_hidden_states=True).hidden_states[-1][:, 1:]
        assert (tokens - model.encoder.backbone(images)).abs().max() < 1e-5


def test_sharded_weights_and_the_cli(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    export(run["ckpt"], out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()
    reloaded = from_pretrained(str(out)).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in run["model"].state_dict().items())

    monkeypatch.setattr(sys, "argv", ["flexvlm", "export", "--ckpt", str(run["ckpt"]), "--out", str(out)])
    assert entry_point.main() == 1
    assert "exists and is not empty" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--overwrite"])
    assert entry_point.main() == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "note: the authors' code runs num_sa_layers 9" in printed
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------- llava-hf


def test_llava_hf_export_loads_back_and_in_transformers(run, tmp_path):
    out = tmp_path / "llava-hf"
    notes = export(run["ckpt"], out, layout="llava-hf", image_token_id=IMAGE_TOKEN)
    assert notes == ["transformers runs this folder as plain LLaVA-1.5 (lr_only), not in flex mode"]
    batch = _batch(96)
    assert (_logits(from_pretrained(str(out)), batch) - _logits(run["model"], batch)).abs().max() < 1e-5

    # transformers: plain LLaVA (W_K', W_V' ignored) is flexvlm's lr_only mode at the tower's size
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    lr_only = from_pretrained(str(out), mode="lr_only", zoom=1).eval()
    prompt = [1, 5, IMAGE_TOKEN_INDEX, 7, 8]
    at = prompt.index(IMAGE_TOKEN_INDEX)
    hf_ids = prompt[:at] + [IMAGE_TOKEN] * 16 + prompt[at + 1:]  # the 4 x 4 low-res tokens
    images, ids = torch.randn(1, 3, 32, 32), torch.tensor([prompt])
    with torch.no_grad():
        expected = lr_only(ids, torch.ones_like(ids), images).logits
        got = llava(input_ids=torch.tensor([hf_ids]), pixel_values=images).logits
    assert (got - expected).abs().max() < 1e-5


def test_llava_hf_needs_an_image_token_of_the_vocabulary(run, tmp_path):
    for token in (None, 64):
        with pytest.raises(ValueError, match=r"needs --image_token_id in \[0, 64\)"):
            export(run["ckpt"], tmp_path / "out", layout="llava-hf", image_token_id=token)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- other modes, other parts


FLEX_KEYS = {"zoom_ratio": "3", "lowres_size": "32", "highres_size": "96"}


@pytest.mark.parametrize("experiment,release_keys,note", [
    ("lr_only", {}, None),
    ("xattn", {}, "the authors' code runs this folder as plain LLaVA-1.5 (lr_only), not in xattn mode"),
    ("hd", {}, "the authors' code runs this folder as plain LLaVA-1.5 (lr_only), not in hd mode"),
    ("flex_random_ratio", {**FLEX_KEYS, "special": "random"}, "the authors' code runs selection RandomSelection("),
    ("flex_attention_ratio", FLEX_KEYS, "the authors' code runs selection AttentionSelection(threshold=64"),
])
def test_other_modes_and_selections_load_back_as_trained(experiment, release_keys, note, tmp_path):
    """The release's keys where it has them (none for a budget: it knows thresholds), the model as
    trained from extra.flexvlm; the random draws repeat, seeded."""
    configs = (BASE, TOWER, str(MODES / f"{experiment}.yaml"))
    ckpt, model = _cheap_run(tmp_path, *configs)
    notes = export(ckpt, tmp_path / "out", configs=configs)
    extra = json.loads((tmp_path / "out" / "config.json").read_text())["extra"]
    assert {k: v for k, v in extra.items() if k != "flexvlm"} == release_keys
    assert [n for n in notes if n.startswith(note)] if note else not notes
    loaded = from_pretrained(str(tmp_path / "out"))
    assert repr(loaded.selection) == repr(model.selection)
    batch = _batch(96)
    assert (_logits(loaded, batch) - _logits(model, batch)).abs().max() < 1e-5
    in_a_yaml = PretrainedFlexVLM(str(tmp_path / "out"))  # what a config builds: the model as trained too
    assert (in_a_yaml.mode, repr(in_a_yaml.selection)) == (model.mode, repr(model.selection))


def test_tied_embeddings_are_saved_once(tmp_path):
    tied = tmp_path / "tied.yaml"
    tied.write_text("model:\n  model:\n    llm_overrides: {tie_word_embeddings: true}\n")
    configs = (BASE, TOWER, str(MODES / "lr_only.yaml"), str(tied))
    ckpt, model = _cheap_run(tmp_path, *configs)
    export(ckpt, tmp_path / "out", configs=configs, layout="llava-hf", image_token_id=IMAGE_TOKEN)
    assert not any("lm_head" in name for name in load_file(tmp_path / "out" / "model.safetensors"))
    batch = _batch(96)
    assert (_logits(from_pretrained(str(tmp_path / "out")), batch) - _logits(model, batch)).abs().max() < 1e-5
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(llava.lm_head.weight, model.llm.lm_head.weight)


def test_a_tower_without_a_release_equivalent_is_refused(tmp_path):
    ckpt, _ = _cheap_run(tmp_path, BASE)  # the built-in task's PatchMLPBackbone
    refused = r"(?s)cannot hold this model:\n  the vision tower PatchMLPBackbone.*run folder"
    with pytest.raises(ValueError, match=refused):
        export(ckpt, tmp_path / "out", configs=[BASE])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_token_reduction_is_refused_not_dropped(tmp_path):
    fastv = tmp_path / "fastv.yaml"
    fastv.write_text("model:\n  model:\n    reduction: fastv\n")
    configs = (BASE, TOWER, str(MODES / "hd.yaml"), str(fastv))
    ckpt, _ = _cheap_run(tmp_path, *configs)
    with pytest.raises(ValueError, match=r"cannot hold this model:\n  the token reduction FastV\(K=2, R=0.5\)"):
        export(ckpt, tmp_path / "out", configs=configs)


def test_the_tokenizer_files_of_the_run_are_copied(run, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3},
                                    "unk_token": "<unk>"},
        "pre_tokenizer": {"type": "Whitespace"}, "added_tokens": [], "normalizer": None, "post_processor": None,
        "decoder": None, "truncation": None, "padding": None,
    }))
    (tokenizer / "tokenizer_config.json").write_text("{}")
    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  class_path: flexvlm.data.datamodule.LlavaDataModule\n  init_args:\n"
                    f"    train_json: none.json\n    image_folder: none\n    tokenizer_path: {tokenizer}\n")
    config = run["ckpt"].parents[1] / "config.yaml"
    export(run["ckpt"], tmp_path / "out", configs=[str(config), str(data)])
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert load_tokenizer(tmp_path / "out").encode("a a") == [3, 3]


# ---------------------------------------------------------------- errors


def test_what_is_not_a_run_checkpoint_is_named(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.ckpt"):
        export(tmp_path / "nowhere.ckpt", out)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(tmp_path, out)  # a folder
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt was not written by torch.save"):
        export(tmp_path / "notes.ckpt", out)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.ckpt")
    with pytest.raises(ValueError, match="weights.ckpt is not a Lightning checkpoint .*no 'state_dict'"):
        export(tmp_path / "weights.ckpt", out)
    torch.save({"state_dict": {}}, tmp_path / "alone.ckpt")  # no run folder around it
    with pytest.raises(FileNotFoundError, match="no config.yaml in .*give the run's configs with --config"):
        export(tmp_path / "alone.ckpt", out)
    save_file({"model.projector.0.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="x.safetensors is not a Lightning checkpoint .*no .state_dict."):
        export(tmp_path / "x.safetensors", out)


def test_weights_of_another_model_are_refused(run, tmp_path):
    ckpt, _ = _cheap_run(tmp_path, BASE, TOWER)  # the run's config without its llm_overrides
    with pytest.raises(ValueError, match="does not hold the weights of the model its config builds"):
        export(ckpt, tmp_path / "out", configs=[str(run["ckpt"].parents[1] / "config.yaml")])


def test_an_out_folder_in_use_is_refused(run, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty .*notes.txt.*--overwrite"):
        export(run["ckpt"], used)
    with pytest.raises(FileExistsError, match="no config.json: --overwrite replaces an earlier export only"):
        export(run["ckpt"], used, overwrite=True)
    assert (used / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is a file"):
        export(run["ckpt"], used / "notes.txt")
    (tmp_path / "empty").mkdir()
    export(run["ckpt"], tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


# ---------------------------------------------------------------- python -m flexvlm --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_flexvlm_commands(flag, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flexvlm", flag])
    with pytest.raises(SystemExit) as exit_info:
        entry_point.main()
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "fit" in printed and "--config" in printed  # LightningCLI's
    assert "check-data  read every sample" in printed and "export      write a trained run" in printed
