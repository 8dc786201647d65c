"""A LLaVA-OneVision folder's config.json (transformers' ``LlavaOnevisionConfig``) as FlexVLM's
constructor arguments: the SigLIP tower, the anyres encoder, the 2-layer projector, the decoder of
``text_config`` and the weights. Every value that no tensor shape reveals is checked, and what flexvlm
does not implement is refused (``settings.settings_from_config``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from flexvlm.architectures.llava_onevision.encoder import AnyresEncoder
from flexvlm.architectures.llava_onevision.preprocess import OneVisionProcessing
from flexvlm.architectures.llava_onevision.settings import MODEL_TYPE, recognises, settings_from_config
from flexvlm.architectures.llava_onevision.weights import OneVisionWeights
from flexvlm.models.families import decoder_config_from_hf
from flexvlm.models.projector import build_projector
from flexvlm.models.siglip import siglip_tower
from flexvlm.weights import read_model_config

__all__ = ["arguments", "recognises"]


def _has_processor(folder: Path) -> bool:
    return (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()


def arguments(folder: str | Path, vision: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """FlexVLM's constructor arguments for a local LLaVA-OneVision folder (transformers'
    ``LlavaOnevisionForConditionalGeneration``, as ``save_pretrained`` writes it, 4.x or 5.x), read from
    its config.json: the SigLIP tower of ``vision_config`` reading ``hidden_states[vision_feature_layer]``
    (before ``post_layernorm``), frozen as in LLaVA-1.5's FlexAttention fine-tune; the anyres encoder
    (``image_grid_pinpoints``, ``vision_aspect_ratio``); the projector; the decoder of ``text_config``;
    the weights (``pretrained``); mode ``flex`` unless ``overrides`` says otherwise. A processor saved in
    the folder must agree with the model (``OneVisionProcessing.from_folder`` checks it).
    ``overrides``: FlexVLM arguments that replace these (``mode``, ``num_sa_layers``, ``selection``...),
    ``llm_overrides`` single decoder settings. ``vision``: refused, the folder holds its tower."""
    folder = Path(folder)
    source = str(folder)
    config = read_model_config(folder)
    if not recognises(config):
        raise ValueError(f"{source}: config.json model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    if vision is not None:
        raise ValueError(f"{source}: a LLaVA-OneVision folder holds its vision tower; `vision` ({vision}) names the "
                         f"tower of LLaVA-1.5's original layout only")
    settings = settings_from_config(config, source)
    if _has_processor(folder):
        OneVisionProcessing.from_folder(folder)  # raises where the processor counts other tokens than the model packs
    family, llm_config = decoder_config_from_hf(settings.text_config, source)
    tower = siglip_tower(settings.vision_config, layer=settings.feature_layer, final_norm=False, frozen=True,
                         source=f"{source} (vision_config)")
    encoder = AnyresEncoder(tower, llm_config.hidden_size, settings.pinpoints, settings.max_views)
    arguments = {
        "encoder": encoder,
        # transformers' LlavaOnevisionMultiModalProjector (linear_1, gelu, linear_2) in LLaVA's layout (0.*, 2.*)
        "projector": build_projector("mlp2x_gelu", tower.embed_dim, llm_config.hidden_size, settings.projector_bias),
        "llm": family(replace(llm_config, **overrides.pop("llm_overrides", None) or {})),
        "mode": "flex",
        "pretrained": OneVisionWeights(source),
    }
    return {**arguments, **overrides}
