"""A SmolVLM / Idefics3 folder's config.json (``SmolVLMForConditionalGeneration``,
``Idefics3ForConditionalGeneration``) as FlexVLM's constructor arguments: the SigLIP tower read at its
``last_hidden_state`` and the tiles (``TiledEncoder``), the connector, the decoder from ``text_config``
(transformers' defaults for absent keys), the weights. The architecture is told from ``model_type``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from flexvlm.architectures.ids import config_of_types, image_token_id_of
from flexvlm.architectures.smolvlm.connector import Connector
from flexvlm.architectures.smolvlm.encoder import TiledEncoder
from flexvlm.architectures.smolvlm.preprocess import SmolVLMProcessing
from flexvlm.architectures.smolvlm.weights import (
    DEFAULT_IMAGE_TOKEN_ID, DEFAULT_SCALE_FACTOR, SmolVLMWeights, effective_text_config,
)
from flexvlm.models.families import decoder_config_from_hf
from flexvlm.models.siglip import siglip_tower
from flexvlm.weights import raise_mismatches

__all__ = ["MODEL_TYPES", "arguments", "image_token_id", "recognises"]

MODEL_TYPES = ("smolvlm", "idefics3")


def recognises(config: dict) -> bool:
    """Whether a config.json is SmolVLM's or Idefics3's (its model_type)."""
    return config.get("model_type") in MODEL_TYPES


def _config(folder: Path) -> dict:
    return config_of_types(folder, MODEL_TYPES)


def image_token_id(folder: str | Path) -> int:
    """The id of ``<image>`` that the model's prompts hold (``image_token_id_of``)."""
    return image_token_id_of(folder, MODEL_TYPES, DEFAULT_IMAGE_TOKEN_ID)


def _saved_processing(folder: Path) -> SmolVLMProcessing | None:
    """The settings of a processor saved beside the model (None without one)."""
    return SmolVLMProcessing.from_folder(folder) if (folder / "processor_config.json").is_file() else None


def _check_processor(processing: SmolVLMProcessing | None, encoder: TiledEncoder, folder: Path) -> None:
    """A processor saved beside the model must cut the views the tower takes, into the tokens it makes."""
    if processing is None:
        return
    problems = []
    if processing.tile_size != encoder.tile_size:
        problems.append(f"max_image_size.longest_edge {processing.tile_size}: the tower's views are "
                        f"{encoder.tile_size} px (vision_config.image_size)")
    if processing.image_seq_len != encoder.grid**2:
        problems.append(f"image_seq_len {processing.image_seq_len}: the connector makes {encoder.grid}^2 = "
                        f"{encoder.grid**2} tokens of a view")
    raise_mismatches(problems, f"{folder} (processor)", "model's config.json")


def arguments(folder: str | Path, vision: str | None = None, **overrides: Any) -> dict[str, Any]:
    """FlexVLM's constructor arguments for a local SmolVLM / Idefics3 folder, read from its config.json:
    ``encoder`` (the tower, frozen, as the paper keeps its tower; ``TiledEncoder``), ``projector`` (the
    connector), ``llm`` (``text_config``'s family and sizes, the top level's ``tie_word_embeddings``),
    ``pretrained`` (the folder's weights). The mode defaults to FlexVLM's (``flex``), so do N_SA and the
    selection; ``overrides`` are any FlexVLM arguments (``mode``, ``num_sa_layers``, ``selection``, ...),
    ``llm_overrides`` changing single decoder settings. The folder holds its tower: ``vision`` is refused."""
    folder = Path(folder)
    source = str(folder)
    if vision is not None:
        raise ValueError(f"{source}: a SmolVLM / Idefics3 folder holds its vision tower; `vision` ({vision!r}) "
                         f"names the tower of LLaVA-1.5's original layout only")
    config = _config(folder)
    family, llm = decoder_config_from_hf(effective_text_config(config), source)
    # the vision config's class is the model's own (Idefics3VisionConfig / SmolVLMVisionConfig), whatever it says
    vision_config = {**(config.get("vision_config") or {}), "model_type": f"{config['model_type']}_vision"}
    tower = siglip_tower(vision_config, layer=-1, final_norm=True, frozen=True, source=source)
    scale = config.get("scale_factor", DEFAULT_SCALE_FACTOR)
    processing = _saved_processing(folder)
    encoder = TiledEncoder(tower, scale, processing.longest_edge if processing else None)
    _check_processor(processing, encoder, folder)
    return {
        "encoder": encoder,
        "projector": Connector(tower.embed_dim * scale**2, llm.hidden_size),
        "llm": family(replace(llm, **overrides.pop("llm_overrides", None) or {})),
        "pretrained": SmolVLMWeights(source),
        **overrides,
    }
