"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
each part tested equal to transformers' (docs/qwen2_vl.md).

- ``preprocess``: the image processor's rules (``smart_resize``, rescale and normalisation, the temporal patches,
  the flattening into ``pixel_values`` and ``image_grid_thw``) and the prompt's image tokens
  (``<|vision_start|>``, one ``<|image_pad|>`` per merged token, ``<|vision_end|>``).
- ``vision``: both vision towers (Qwen2-VL's; Qwen2.5-VL's with window attention), loading transformers'
  ``visual.*`` / ``model.visual.*`` tensors by name.
- ``positions``: the decoder's multimodal RoPE, its (3, B, L) position ids and rope deltas (``rope_index``, as
  ``get_rope_index``) and its cos / sin tables (``mrope_cos_sin``).

- ``settings``, ``config``, ``encoder``, ``weights``: the model as FlexVLM builds it (``from_pretrained``): in
  ``hd`` each image at its native resolution, in ``lr_only`` at max_pixels // zoom^2, in ``xattn`` / ``flex``
  the reduced image in the sequence and the native one's tokens as high-res keys (``positions.high_res_positions``
  places them); its config.json read as FlexVLM's arguments, the encoder that places the tower's merged tokens at
  the pad tokens and gives the prompt's multimodal RoPE positions, the decoder's and the tower's weights.

Not yet wired: the data pipeline's image processor, and xattn / flex for a batch whose reduced grids differ.
"""

from flexvlm.architectures.ids import flexvlm_input_ids
from flexvlm.architectures.qwen2_vl.config import arguments, image_token_id
from flexvlm.architectures.qwen2_vl.encoder import QwenEncoder
from flexvlm.architectures.qwen2_vl.positions import image_positions, mrope_cos_sin, rope_index
from flexvlm.architectures.qwen2_vl.preprocess import (
    PackedImages, QwenImage, QwenImageBatch, QwenVLProcessing, batch_images, batch_samples, expand_prompt,
    image_prompt, num_image_tokens, preprocess_image, prompt_ids, reduced_processing, smart_resize,
)
from flexvlm.architectures.qwen2_vl.settings import MODEL_TYPES, recognises, text_config
from flexvlm.architectures.qwen2_vl.weights import QwenVLWeights, load_qwen_vl
from flexvlm.architectures.qwen2_vl.vision import (
    QwenVisionTower, VisionSettings, load_vision_tower, patch_positions, vision_state, window_order,
)

__all__ = [
    "MODEL_TYPES", "PackedImages", "QwenEncoder", "QwenImage", "QwenImageBatch", "QwenVLProcessing", "QwenVLWeights",
    "QwenVisionTower", "VisionSettings", "arguments", "batch_images", "batch_samples", "expand_prompt",
    "flexvlm_input_ids", "image_positions", "image_prompt", "image_token_id", "load_qwen_vl", "load_vision_tower",
    "mrope_cos_sin", "num_image_tokens", "patch_positions", "preprocess_image", "prompt_ids", "recognises",
    "reduced_processing", "rope_index", "smart_resize", "text_config", "vision_state", "window_order",
]
