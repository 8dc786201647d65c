"""A Qwen2-VL / Qwen2.5-VL folder's config.json (transformers' ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``) as FlexVLM's constructor arguments: the vision tower of ``vision_config``
and the encoder that places its tokens (``QwenEncoder``, every mode), the identity as projector (the tower's merger maps to
the decoder's width), the Qwen2 decoder of ``text_config`` with multimodal RoPE, the weights. The architecture is
told from ``model_type``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from flexvlm.architectures.ids import config_of_types, image_token_id_of
from flexvlm.architectures.qwen2_vl.encoder import DEFAULT_ZOOM, QwenEncoder
from flexvlm.architectures.qwen2_vl.preprocess import QwenVLProcessing
from flexvlm.architectures.qwen2_vl.settings import DEFAULT_IMAGE_TOKEN_ID, MODEL_TYPES, recognises, text_config
from flexvlm.architectures.qwen2_vl.vision import QwenVisionTower, VisionSettings
from flexvlm.architectures.qwen2_vl.weights import QwenVLWeights
from flexvlm.models.families import decoder_config_from_hf
from flexvlm.weights import raise_mismatches

__all__ = ["arguments", "image_token_id", "recognises"]


def _config(folder: Path) -> dict:
    return config_of_types(folder, MODEL_TYPES)


def image_token_id(folder: str | Path) -> int:
    """The id of ``<|image_pad|>`` that the model's prompts hold (``image_token_id_of``)."""
    return image_token_id_of(folder, MODEL_TYPES, DEFAULT_IMAGE_TOKEN_ID)


def _processing(folder: Path) -> QwenVLProcessing:
    """The image settings of a processor saved beside the model; transformers' defaults without one."""
    saved = (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()
    return QwenVLProcessing.from_folder(folder) if saved else QwenVLProcessing()


def arguments(folder: str | Path, vision: str | None = None, **overrides: Any) -> dict[str, Any]:
    """FlexVLM's constructor arguments for a local Qwen2-VL / Qwen2.5-VL folder, read from its config.json: the
    ``encoder`` (the tower of ``vision_config``, the image settings of the processor saved beside it, ``zoom``:
    the reduced resolution of ``lr_only``, by default ``encoder.DEFAULT_ZOOM``), the identity ``projector``, the
    ``llm`` (``text_config``'s Qwen2 with its ``mrope_section``, the top level's ``tie_word_embeddings``), the
    ``pretrained`` weights; mode ``hd``, the original model, unless ``overrides`` says otherwise.
    ``overrides``: any FlexVLM arguments, ``llm_overrides`` single decoder settings.
    The folder holds its tower: ``vision`` is refused."""
    folder = Path(folder)
    source = str(folder)
    if vision is not None:
        raise ValueError(f"{source}: a Qwen2-VL folder holds its vision tower; `vision` ({vision!r}) names the "
                         f"tower of LLaVA-1.5's original layout only")
    config = _config(folder)
    mode = overrides.pop("mode", "hd")
    family, llm = decoder_config_from_hf(text_config(config), source)
    settings = VisionSettings.from_config(config, source)
    if settings.out_width != llm.hidden_size:
        raise_mismatches([f"the vision merger's output {settings.out_width} vs the decoder's hidden_size "
                          f"{llm.hidden_size}"], source, "Qwen2-VL model")
    encoder = QwenEncoder(QwenVisionTower(settings), _processing(folder), overrides.pop("zoom", DEFAULT_ZOOM))
    return {
        "encoder": encoder,
        "projector": nn.Identity(),
        "llm": family(replace(llm, **overrides.pop("llm_overrides", None) or {})),
        "mode": mode,
        "pretrained": QwenVLWeights(source),
        **overrides,
    }
