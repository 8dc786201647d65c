"""Prompt ids as an architecture's processor makes them -> FlexVLM's input (shared by the architectures whose
prompts hold one image token per image embedding, as transformers' processors expand them)."""

from torch import Tensor

from flexvlm.constants import IMAGE_TOKEN_INDEX

__all__ = ["flexvlm_input_ids"]


def flexvlm_input_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """The processor's ids with its image token (the checkpoint's ``<image>`` id) turned into
    ``IMAGE_TOKEN_INDEX``, the placeholder FlexVLM replaces with the image's tokens, in order."""
    return input_ids.masked_fill(input_ids == image_token_id, IMAGE_TOKEN_INDEX)
