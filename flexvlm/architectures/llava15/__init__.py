"""LLaVA-1.5 (llava-hf's LlavaForConditionalGeneration, the original LlavaLlamaForCausalLM layout, and
the authors' released FlexAttention checkpoint): its config.json as FlexVLM's arguments, its weights."""

from flexvlm.architectures.llava15.config import arguments_from_llava, recognises, release_arguments
from flexvlm.architectures.llava15.weights import (
    LLAVA_HF_LAYOUT, ORIGINAL_LLAVA_LAYOUT, PretrainedWeights, load_llava, load_projector,
)

__all__ = [
    "LLAVA_HF_LAYOUT", "ORIGINAL_LLAVA_LAYOUT", "PretrainedWeights", "arguments_from_llava", "load_llava",
    "load_projector", "recognises", "release_arguments",
]
