"""SmolVLM / Idefics3 weights (a folder that transformers' ``save_pretrained`` wrote) into a FlexVLM built by
``flexvlm.architectures.smolvlm.arguments``: the decoder (``model.text_model.*``, ``lm_head.weight``), the
connector (``model.connector.*``) and the SigLIP tower (``model.vision_model.*``), strictly.

transformers 4.x and 5.x write ``*ForConditionalGeneration`` with the same names (its ``model`` is the
``*Model``, whose parts are ``text_model``, ``vision_model`` and ``connector``); a folder of the bare ``*Model``
holds them without ``model.`` and has no ``lm_head`` (which then exists only with tied embeddings)."""

from __future__ import annotations

from pathlib import Path

from flexvlm.models.families import load_decoder_state
from flexvlm.models.siglip import load_siglip
from flexvlm.models.vlm import FlexVLM, WeightLoader
from flexvlm.weights import (
    StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_config, take_parts,
)

__all__ = ["SmolVLMWeights", "effective_text_config", "load_smolvlm"]

# the Idefics3 / SmolVLM config's own defaults (transformers 5.x's Idefics3Config / SmolVLMConfig)
DEFAULT_SCALE_FACTOR = 2
DEFAULT_IMAGE_TOKEN_ID = 128257
# the text config transformers builds when config.json has none (a LLaMA with its rms_norm_eps of 1e-5)
DEFAULT_TEXT_CONFIG = {"model_type": "llama", "rms_norm_eps": 1e-5}


def effective_text_config(config: dict) -> dict:
    """The decoder's config as transformers runs it: ``text_config`` (or its default), with the top level's
    ``tie_word_embeddings``, which alone decides whether ``lm_head`` is tied to the embeddings (transformers 5
    ties ``*ForConditionalGeneration``'s weights by its own config; the text config's flag has no head to tie)."""
    text = dict(config.get("text_config") or DEFAULT_TEXT_CONFIG)
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return text


def _prefixes(state: StateDict) -> dict[str, tuple[str, str]]:
    """{checkpoint prefix: (part, flexvlm prefix)} of the folder's layout."""
    base = "model." if any(k.startswith("model.") for k in state) else ""  # *ForConditionalGeneration, or *Model
    return {f"{base}text_model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
            f"{base}connector.": ("projector", ""), f"{base}vision_model.": ("vision", "")}


def load_smolvlm(model: FlexVLM, path: str | Path) -> None:
    """A SmolVLM / Idefics3 folder into ``model``; every part strict (a missing, unexpected or mis-shaped tensor
    names the folder), settings no shape reveals checked against the model."""
    source = str(path)
    state, config = read_checkpoint(path), read_config(path)
    prefixes = _prefixes(state)
    scale = config.get("scale_factor", DEFAULT_SCALE_FACTOR)
    problems = [f"scale_factor {scale}: the model's {what} shuffles by {part.scale_factor}"
                for what, part in (("encoder", model.encoder), ("connector", model.projector))
                if getattr(part, "scale_factor", scale) != scale]
    raise_mismatches(problems, source, "model")
    vision_prefix = next(p for p, (part, _) in prefixes.items() if part == "vision")
    parts = take_parts(state, prefixes, source)
    load_decoder_state(model.llm, parts["llm"], source, effective_text_config(config))
    load_state_dict_strict(model.projector, parts["projector"], source)
    load_siglip(model.encoder.tower, state, vision_prefix, source)


class SmolVLMWeights(WeightLoader):
    """The weights of a local SmolVLM / Idefics3 folder (``FlexVLM(pretrained=SmolVLMWeights(folder))``);
    W_K', W_V' that it lacks start as their layer's W_K, W_V."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def apply(self, model: FlexVLM) -> None:
        load_smolvlm(model, self.folder)
