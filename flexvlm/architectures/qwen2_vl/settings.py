"""What a Qwen2-VL / Qwen2.5-VL config.json says about the decoder, as transformers 5.24 reads it."""

from __future__ import annotations

__all__ = ["DEFAULT_IMAGE_TOKEN_ID", "MODEL_TYPES", "recognises", "text_config"]

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
DEFAULT_IMAGE_TOKEN_ID = 151655  # <|image_pad|>, the configs' default image_token_id

# Qwen2VLTextConfig's / Qwen2_5_VLTextConfig's defaults (the same), for keys a config.json leaves out; the modeling
# code's mrope_section where the RoPE parameters name none
_TEXT_DEFAULTS = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
    "hidden_act": "silu",
}
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}


def recognises(config: dict) -> bool:
    """Whether a config.json is Qwen2-VL's or Qwen2.5-VL's (its model_type)."""
    return config.get("model_type") in MODEL_TYPES


def text_config(config: dict) -> dict:
    """The decoder's config as transformers runs it: ``text_config`` (transformers 5), or the top level's keys
    (the hub's folders, written by transformers 4.x), absent keys at the text config's defaults; with the top
    level's ``tie_word_embeddings``, which alone decides whether ``lm_head`` is tied (the text config has none)."""
    text = dict(config.get("text_config") or {k: v for k, v in config.items() if k != "vision_config"})
    text = {**_TEXT_DEFAULTS, **text, "model_type": f"{config['model_type']}_text"}
    # the hub's configs name the RoPE rope_scaling {type: mrope, mrope_section} beside a top-level rope_theta
    rope = dict(text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {})
    if "rope_theta" in text:
        rope.setdefault("rope_theta", text["rope_theta"])
    text["rope_parameters"] = {**_DEFAULT_ROPE, **rope}
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return text
