"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration): its preprocessing
(``preprocess``), its anyres image encoding (``encoder.AnyresEncoder``), its config.json as FlexVLM's
arguments (``config.arguments``) and its weights (``weights``)."""

from flexvlm.architectures.ids import flexvlm_input_ids
from flexvlm.architectures.llava_onevision.config import arguments
from flexvlm.architectures.llava_onevision.encoder import AnyresEncoder, ImageNewline, grid_tokens, high_res_canvas
from flexvlm.architectures.llava_onevision.settings import OneVisionSettings, recognises, settings_from_config
from flexvlm.architectures.llava_onevision.weights import OneVisionWeights, load_onevision

__all__ = [
    "AnyresEncoder", "ImageNewline", "OneVisionSettings", "OneVisionWeights", "arguments", "flexvlm_input_ids",
    "grid_tokens", "high_res_canvas", "load_onevision", "recognises", "settings_from_config",
]
