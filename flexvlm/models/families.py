"""The decoder families flexvlm ships, and their presets by name (``FlexVLM(llm="vicuna-7b-v1.5")``).
A family outside this list needs no entry here: a YAML names its class by ``class_path``."""

from __future__ import annotations

from typing import Any

from flexvlm.models.decoder import DecoderConfig, LanguageModel
from flexvlm.models.gemma import Gemma
from flexvlm.models.llm import Llama
from flexvlm.models.qwen2 import Qwen2

FAMILIES: tuple[type[LanguageModel], ...] = (Llama, Qwen2, Gemma)


def preset(name: str, **overrides: Any) -> tuple[type[LanguageModel], DecoderConfig]:
    """The family and config of the preset ``name``, its fields changed by ``overrides``."""
    for family in FAMILIES:
        if name in family.config_class.presets:
            return family, family.config_class.from_name(name, **overrides)
    names = sorted(n for family in FAMILIES for n in family.config_class.presets)
    raise ValueError(f"unknown LLM preset {name!r}; valid presets: {names}")
