"""A LLaVA-1.5 folder's config.json as FlexVLM's constructor arguments: llava-hf's layout, the original
one, the authors' released FlexAttention checkpoint (its `extra` settings) and what `flexvlm export`
writes (`extra.flexvlm`), so that nothing has to be written by hand to match a checkpoint. The layout
is told from the files, never from a folder name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from flexvlm.architectures.llava15.weights import PretrainedWeights
from flexvlm.models.clip import clip_backbone_from_hf
from flexvlm.models.families import decoder_config_from_hf
from flexvlm.selection import SELECTION, AttentionSelection, RandomSelection, SelectionStrategy
from flexvlm.weights import raise_mismatches, read_config, read_model_config

# config.json model_types of LLaVA-1.5: llava-hf's and the original code's (LLaMA and Qwen2 decoders)
MODEL_TYPES = ("llava", "llava_llama", "llava_qwen")


def recognises(config: dict) -> bool:
    """Whether a config.json is LLaVA-1.5's: its model_type, or the original layout's `mm_*` keys."""
    return config.get("model_type") in MODEL_TYPES or any(k in config for k in ("mm_projector_type", "mm_vision_tower"))


# What the authors' release hard-codes rather than reads from `extra`: FlexAttention from layer 9 on
# (`layer_idx > 8`), the threshold rule on 9 x 9 blocks, the random ablation's Bernoulli(0.1) on 8 x 8 blocks.
_RELEASE_SA_LAYERS = 9
_RELEASE_BLOCK_GRID = 9
_RELEASE_RANDOM_BLOCK_GRID = 8
_RELEASE_RANDOM_RATE = 0.1


def _extra_int(extra: dict, key: str, source: str, default: int | None = None) -> int:
    """An integer setting of the release's `extra` (written as a string)."""
    value = extra.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: config.json extra {key!r} = {value!r} is not an integer") from None


def _release_selection(extra: dict, source: str) -> SelectionStrategy:
    """The release's selection, on whole blocks as it keeps them: its threshold rule, or with
    `special: random` the flexvlm strategy closest to its Bernoulli(0.1) draw on 8 x 8 blocks (10 %
    of the image's blocks, a fixed count instead of a varying one)."""
    special = extra.get("special")
    if special == "random":
        return RandomSelection(ratio=_RELEASE_RANDOM_RATE, block_grid=_RELEASE_RANDOM_BLOCK_GRID, whole_blocks=True)
    if special is not None:
        raise ValueError(f"{source}: config.json extra 'special' = {special!r}; the release knows 'random' only")
    threshold = _extra_int(extra, "threshold", source, default=64)  # the release's default when unset
    return AttentionSelection(threshold=threshold, block_grid=_RELEASE_BLOCK_GRID, whole_blocks=True)


def release_arguments(extra: dict, tower_size: int, source: str) -> dict[str, Any]:
    """FlexVLM arguments from the `extra` settings of the authors' released checkpoint; none for a
    checkpoint without them (the release reads `extra` only when it names `zoom_ratio`). The warm-up
    (`warmup`) is a training setting: the LightningModule's `alpha_warmup` is 1 / warmup."""
    if "zoom_ratio" not in extra:
        return {}
    zoom = _extra_int(extra, "zoom_ratio", source)
    problems = []
    low_res = _extra_int(extra, "lowres_size", source, default=tower_size)
    if low_res != tower_size:
        problems.append(f"extra lowres_size {low_res}: flexvlm's low-res view is the tower's native size, {tower_size}")
    high_res = _extra_int(extra, "highres_size", source, default=zoom * low_res)
    if high_res != zoom * low_res:
        problems.append(f"extra highres_size {high_res}: flexvlm's high-res image is zoom_ratio x lowres_size, "
                        f"{zoom * low_res}")
    raise_mismatches(problems, source, "model flexvlm builds")
    return {"num_sa_layers": _RELEASE_SA_LAYERS, "zoom": zoom, "selection": _release_selection(extra, source),
            "margin_rule": "release"}


def exported_arguments(saved: dict) -> dict[str, Any]:
    """FlexVLM arguments that `flexvlm.export` writes under `extra.flexvlm`: the model as trained, where
    the release's own keys cannot say it (it hard-codes N_SA, the blocks and the margin rule). The
    selection is named as registered (plugins included), with the arguments it was built with."""
    arguments = dict(saved)
    if "selection" in arguments:
        selection = arguments["selection"]
        arguments["selection"] = SELECTION.get(selection["name"])(**selection["settings"])
    return arguments


def _is_llava_hf(config: dict) -> bool:
    """llava-hf nests its decoder's and its tower's configs; the original layout is LLaMA's config
    plus `mm_*` keys."""
    return "vision_config" in config


def _vision_tower(folder: Path, config: dict, vision: str | Path | None) -> tuple[str | None, dict]:
    """Where the tower's weights come from (None: the checkpoint, as llava-hf holds its tower) and its
    HF config. Without `vision`, the original layout's tower is `mm_vision_tower` if that names a
    local folder (relative to the checkpoint)."""
    if vision is None and _is_llava_hf(config):
        return None, config["vision_config"]
    if vision is None:
        named = config.get("mm_vision_tower")
        if not named or not (folder / named).is_dir():
            raise ValueError(f"{folder}: the vision tower {named!r} (config.json mm_vision_tower) is not a local "
                             f"folder; give the local CLIP folder as `vision`")
        vision = folder / named
    tower_config = read_config(vision)
    if not tower_config:
        raise ValueError(f"{vision}: no config.json; the tower is built from a HF CLIPModel / CLIPVisionModel folder")
    return str(vision), tower_config.get("vision_config", tower_config)


def _llava_projector(config: dict, source: str) -> str:
    """The projector kind (`build_projector`): the original layout names it; llava-hf's is always
    linear, activation, linear."""
    if not _is_llava_hf(config):
        return config.get("mm_projector_type", "linear")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise_mismatches([f"projector_hidden_act {act!r}: the mlp2x_gelu projector uses gelu"], source, "projector")
    return "mlp2x_gelu"


def arguments_from_llava(
    checkpoint: str | Path,
    vision: str | Path | None = None,
    num_sa_layers: int | None = None,
    selection: SelectionStrategy | str | None = None,
    zoom: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """FlexVLM's constructor arguments for a local LLaVA-1.5 folder, read from its config.json: the
    llava-hf layout, the original one, or the authors' released FlexAttention checkpoint (the
    original plus `*_proj_hd` and an `extra` object). The decoder's family (`model_type`), sizes,
    vocabulary, RMSNorm eps, RoPE theta and maximum length (llava-hf: `text_config`); the projector;
    the CLIP tower's shape, activation and feature layer (llava-hf: `vision_config`; otherwise the
    config of `vision`, which defaults to `mm_vision_tower` when that is a local folder), frozen as
    LLaVA-1.5 keeps it; the weights (`pretrained`).

    With the release's `extra`: N_SA = 9 (what the release hard-codes), zoom `zoom_ratio`, and its
    selection, keeping whole blocks (`_release_selection`). Without, FlexVLM's defaults. A flexvlm
    export's `extra.flexvlm` (`flexvlm.export`) then gives the model as trained.
    `num_sa_layers`, `selection` and `zoom` replace the checkpoint's when given; `overrides` are
    any other FlexVLM arguments (`mode`, ...), `llm_overrides` changing single decoder settings."""
    folder = Path(checkpoint)
    source = str(folder)
    config = read_model_config(folder)
    family, llm = decoder_config_from_hf(config.get("text_config", config), source)
    tower, tower_config = _vision_tower(folder, config, vision)
    feature_key = "vision_feature_layer" if _is_llava_hf(config) else "mm_vision_select_layer"
    backbone = clip_backbone_from_hf(tower_config, config.get(feature_key, -2), tower or source)
    arguments = {
        "backbone": backbone,
        "llm": family(replace(llm, **overrides.pop("llm_overrides", {}))),
        "projector": _llava_projector(config, source),
        "pretrained": PretrainedWeights(llava=source, vision=tower),
        **release_arguments(config.get("extra") or {}, backbone.image_size, source),
        **exported_arguments((config.get("extra") or {}).get("flexvlm") or {}),
    }
    if overrides.get("mode", arguments.get("mode", "flex")) != "flex":  # a selection serves the flex mode alone
        arguments.pop("selection", None)
    chosen = {"num_sa_layers": num_sa_layers, "selection": selection, "zoom": zoom}
    return {**arguments, **{k: v for k, v in chosen.items() if v is not None}, **overrides}
