"""SmolVLM / Idefics3 (transformers' SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration): its
preprocessing (``preprocess``), its views as FlexVLM places them (``TiledEncoder``), the connector, its
config.json as FlexVLM's arguments and its weights."""

from flexvlm.architectures.ids import flexvlm_input_ids
from flexvlm.architectures.smolvlm.config import MODEL_TYPES, arguments, image_token_id, recognises
from flexvlm.architectures.smolvlm.connector import Connector, pixel_shuffle
from flexvlm.architectures.smolvlm.encoder import TiledEncoder, stitch_tiles
from flexvlm.architectures.smolvlm.weights import SmolVLMWeights, load_smolvlm

__all__ = [
    "MODEL_TYPES", "Connector", "SmolVLMWeights", "TiledEncoder", "arguments", "flexvlm_input_ids",
    "image_token_id", "load_smolvlm", "pixel_shuffle", "recognises", "stitch_tiles",
]
