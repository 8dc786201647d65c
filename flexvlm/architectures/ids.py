"""Prompt ids as an architecture's processor makes them -> FlexVLM's input (shared by the architectures whose
prompts hold one image token per image embedding, as transformers' processors expand them)."""

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.weights import read_model_config

__all__ = ["config_of_types", "flexvlm_input_ids", "image_token_id_of"]


def config_of_types(folder: str | Path, model_types: Sequence[str]) -> dict:
    """A folder's config.json, refused with its model_type unless it is one of ``model_types``."""
    config = read_model_config(folder)
    if config.get("model_type") not in model_types:
        raise ValueError(f"{folder}: config.json model_type {config.get('model_type')!r} is not one of "
                         f"{', '.join(model_types)}")
    return config


def image_token_id_of(folder: str | Path, model_types: Sequence[str], default: int) -> int:
    """The id of the image token that the prompts of a folder of ``model_types`` hold (config.json
    ``image_token_id``, else the architecture's ``default``), which ``flexvlm_input_ids`` turns into
    FlexVLM's placeholder."""
    return config_of_types(folder, model_types).get("image_token_id", default)


def flexvlm_input_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """The processor's ids with its image token (the checkpoint's ``<image>`` id) turned into
    ``IMAGE_TOKEN_INDEX``, the placeholder FlexVLM replaces with the image's tokens, in order."""
    return input_ids.masked_fill(input_ids == image_token_id, IMAGE_TOKEN_INDEX)
