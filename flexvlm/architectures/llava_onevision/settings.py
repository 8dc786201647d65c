"""What flexvlm builds of a LLaVA-OneVision config.json (transformers' ``LlavaOnevisionConfig``): its
settings, transformers' defaults for the keys it leaves out, and a refusal, naming the key, of every
value flexvlm does not implement. Read by the model's arguments (``config.py``) and again by the
weights' loader (``weights.py``), which checks the model it loads into against them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from flexvlm.architectures.llava_onevision.preprocess import Size
from flexvlm.weights import raise_mismatches

MODEL_TYPE = "llava_onevision"

# transformers' LlavaOnevisionConfig defaults (5.24), for keys a config.json leaves out
_VISION_DEFAULTS = {  # its vision_config when there is none: SigLIP so400m at 384 px
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14,
    "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False,
}
DEFAULT_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7))


def recognises(config: dict) -> bool:
    """Whether a config.json is LLaVA-OneVision's (transformers' model_type)."""
    return config.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class OneVisionSettings:
    """What flexvlm builds of a LLaVA-OneVision config.json."""

    vision_config: dict
    text_config: dict  # with the model's tie_word_embeddings (see ``text_config``)
    feature_layer: int
    pinpoints: tuple[Size, ...]
    max_views: int
    projector_bias: bool
    image_token_id: int


def text_config(config: dict) -> dict:
    """The decoder's config: ``text_config`` (Qwen2 when it names no model_type, as transformers'), its
    embeddings tied when the model's config or the text config ties them (transformers 5 ties by the
    model's, which takes the text config's when it is set there)."""
    text = {"model_type": "qwen2", **(config.get("text_config") or {})}
    return {**text, "tie_word_embeddings": bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))}


def settings_from_config(config: dict, source: str) -> OneVisionSettings:
    """The folder's settings, every one flexvlm does not implement refused with its key."""
    # as transformers: a vision_config dict takes SiglipVisionConfig's defaults, none at all so400m's
    vision = dict(config["vision_config"]) if config.get("vision_config") is not None else dict(_VISION_DEFAULTS)
    vision.setdefault("model_type", "siglip_vision_model")
    problems = []
    if vision["model_type"] != "siglip_vision_model":
        problems.append(f"vision_config model_type {vision['model_type']!r}: LLaVA-OneVision's tower is a SigLIP "
                        f"vision model (siglip_vision_model)")
    layer = config.get("vision_feature_layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        problems.append(f"vision_feature_layer {layer!r}: flexvlm reads one layer of the tower (an int), not several "
                        f"concatenated")
    strategy = config.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        problems.append(f"vision_feature_select_strategy {strategy!r}: flexvlm feeds every token of a view ('full'); "
                        f"'default' drops a first token that SigLIP does not have as a class token")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        problems.append(f"projector_hidden_act {act!r}: the projector is linear, gelu, linear")
    aspect = config.get("vision_aspect_ratio", "anyres_max_9")
    budget = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if budget is None or int(budget.group(1)) < 1:
        problems.append(f"vision_aspect_ratio {aspect!r}: flexvlm implements anyres_max_N, N >= 1")
    pinpoints = config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
               for p in pinpoints):
        problems.append(f"image_grid_pinpoints {pinpoints!r}: expected [height, width] pairs of positive ints")
    elif isinstance(vision.get("image_size"), int):
        ragged = [list(p) for p in pinpoints if p[0] % vision["image_size"] or p[1] % vision["image_size"]]
        if ragged:
            # transformers would cut a ragged last tile and stretch it, which its token count ignores
            problems.append(f"image_grid_pinpoints {ragged}: not multiples of the view size (vision_config "
                            f"image_size {vision['image_size']})")
    raise_mismatches(problems, source, "LLaVA-OneVision flexvlm builds")
    return OneVisionSettings(
        vision_config=vision, text_config=text_config(config), feature_layer=layer,
        pinpoints=tuple(tuple(p) for p in pinpoints), max_views=int(budget.group(1)),
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        image_token_id=config.get("image_token_index", config.get("image_token_id", 151646)),
    )
