"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
the parts that need no change to flexvlm's decoder, each tested equal to transformers' (docs/qwen2_vl.md).

- ``preprocess``: the image processor's rules (``smart_resize``, rescale and normalisation, the temporal patches,
  the flattening into ``pixel_values`` and ``image_grid_thw``) and the prompt's image tokens
  (``<|vision_start|>``, one ``<|image_pad|>`` per merged token, ``<|vision_end|>``).
- ``vision``: both vision towers (Qwen2-VL's; Qwen2.5-VL's with window attention), loading transformers'
  ``visual.*`` / ``model.visual.*`` tensors by name.
- ``positions``: the decoder's multimodal RoPE, its (3, B, L) position ids and rope deltas (``rope_index``, as
  ``get_rope_index``) and its cos / sin tables (``mrope_cos_sin``).

Not yet wired, for a later change once the refactor of the decoder under way lands: the decoder's use of
multimodal RoPE (its rotary embedding fed (3, B, L) ids and ``mrope_section``, the rope deltas while generating),
the decoder's weights (``model.*`` as saved, ``model.language_model.*`` in memory), the FlexVLM geometry (a
``VisualLayout`` of the merged grid, the high-res keys and their 3-D positions), the encoder that places the
tower's tokens, the config.json reader and the registry line in ``flexvlm.architectures``; so ``from_pretrained``
does not build these models yet.
"""

from flexvlm.architectures.qwen2_vl.positions import image_positions, mrope_cos_sin, rope_index
from flexvlm.architectures.qwen2_vl.preprocess import (
    QwenImage, QwenVLProcessing, batch_images, expand_prompt, image_prompt, num_image_tokens, preprocess_image,
    prompt_ids, smart_resize,
)
from flexvlm.architectures.qwen2_vl.vision import (
    QwenVisionTower, VisionSettings, load_vision_tower, patch_positions, vision_state, window_order,
)

__all__ = [
    "QwenImage", "QwenVLProcessing", "QwenVisionTower", "VisionSettings", "batch_images", "expand_prompt",
    "image_positions", "image_prompt", "load_vision_tower", "mrope_cos_sin", "num_image_tokens", "patch_positions",
    "preprocess_image", "prompt_ids", "rope_index", "smart_resize", "vision_state", "window_order",
]
