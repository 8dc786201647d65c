"""Qwen2-VL / Qwen2.5-VL weights (transformers' ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``) into a FlexVLM built by ``config.arguments``: the decoder and the vision
tower, strictly (a missing, unexpected or mis-shaped tensor names the folder), the decoder's settings that no
shape reveals checked against config.json.

Two layouts of names exist:

- as saved (transformers 5's ``save_pretrained``, which reverses its conversion mapping, and the hub's folders):
  ``model.*`` the decoder, ``lm_head.*``, ``visual.*`` the tower;
- transformers 5's module tree (a state dict taken in memory): ``model.language_model.*``, ``lm_head.*``,
  ``model.visual.*``.

With tied embeddings (the top level's ``tie_word_embeddings``) no ``lm_head.weight`` is saved."""

from __future__ import annotations

from pathlib import Path

from flexvlm.architectures.qwen2_vl.encoder import QwenEncoder
from flexvlm.architectures.qwen2_vl.settings import text_config
from flexvlm.models.families import load_decoder_state
from flexvlm.models.vlm import FlexVLM, WeightLoader
from flexvlm.weights import StateDict, load_state_dict_strict, read_checkpoint, read_config, take_parts

__all__ = ["QwenVLWeights", "load_qwen_vl"]

SAVED = {"model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."), "visual.": ("vision", "")}
IN_MEMORY = {"model.language_model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
             "model.visual.": ("vision", "")}


def _prefixes(state: StateDict) -> dict[str, tuple[str, str]]:
    """The layout of the folder's names: transformers' module tree where its decoder is under its own name."""
    return IN_MEMORY if any(k.startswith("model.language_model.") for k in state) else SAVED


def load_qwen_vl(model: FlexVLM, path: str | Path) -> None:
    """A Qwen2-VL / Qwen2.5-VL folder into ``model``: the decoder (W_K', W_V' that the folder lacks start as W_K,
    W_V) and the vision tower with its merger."""
    source = str(path)
    if not isinstance(model.encoder, QwenEncoder):
        raise TypeError(f"{source}: Qwen2-VL weights load into a FlexVLM with a QwenEncoder, got "
                        f"{type(model.encoder).__name__}")
    state, config = read_checkpoint(path), read_config(path)
    parts = take_parts(state, _prefixes(state), source)
    load_decoder_state(model.llm, parts["llm"], source, text_config(config))
    load_state_dict_strict(model.encoder.tower, parts["vision"], f"{source} (visual)")


class QwenVLWeights(WeightLoader):
    """A Qwen2-VL / Qwen2.5-VL folder as a FlexVLM's ``pretrained`` weights (``config.arguments`` names it)."""

    def __init__(self, folder: str) -> None:
        self.folder = str(folder)

    def apply(self, model: FlexVLM) -> None:
        load_qwen_vl(model, self.folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r})"
