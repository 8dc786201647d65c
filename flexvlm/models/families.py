"""The decoder families flexvlm ships, in one registry: each with its presets by name
(``FlexVLM(llm="vicuna-7b-v1.5")``) and its transformers adapter (config reader, tensor names,
``model_type``s), through which transformers' checkpoints of the family are read and written. A
family outside the registry still works from a YAML by ``class_path``; the registry is what reads
its transformers checkpoints. A checkpoint's family is told from its config.json, never a folder
name, and settings that no tensor shape reveals (RMSNorm eps, RoPE) are checked against the model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from flexvlm.models.decoder import DecoderConfig, LanguageModel
from flexvlm.models.gemma import Gemma, gemma_config_from_hf
from flexvlm.models.llm import Llama, llama_config_from_hf
from flexvlm.models.qwen2 import Qwen2, qwen2_config_from_hf
from flexvlm.weights import StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_config


# W_K' / W_V' (`self_attn.{k,v}...`) as the authors' released checkpoint names them, and as flexvlm does
_RELEASED_HIGH_RES, _FLEXVLM_HIGH_RES = "_proj_hd.", "_hr_proj."


def _high_res_renamed(state: StateDict, old: str, new: str) -> StateDict:
    pattern = re.compile(rf"(self_attn\.[kv]){re.escape(old)}")
    return {pattern.sub(rf"\1{new}", k): v for k, v in state.items()}


def llama_from_hf(state: StateDict) -> StateDict:
    """`LlamaForCausalLM` names (which `Qwen2ForCausalLM` and `GemmaForCausalLM` share) are flexvlm's
    already; the RoPE buffers that older transformers versions saved are dropped (they are
    recomputed), and the authors' released FlexAttention checkpoint names W_K' / W_V'
    `self_attn.{k,v}_proj_hd`, flexvlm `self_attn.{k,v}_hr_proj`."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return _high_res_renamed(state, _RELEASED_HIGH_RES, _FLEXVLM_HIGH_RES)


def llama_to_hf(state: StateDict) -> StateDict:
    """The inverse of `llama_from_hf`: W_K' / W_V' under the release's names (`flexvlm.export`)."""
    return _high_res_renamed(state, _FLEXVLM_HIGH_RES, _RELEASED_HIGH_RES)


@dataclass(frozen=True)
class Family:
    """A decoder family, and how its transformers checkpoints are read and written."""

    model: type[LanguageModel]
    config_from_hf: Callable[[dict, str], DecoderConfig]  # its config.json (or llava-hf's text_config)
    model_types: tuple[str, ...]  # config.json `model_type`s of the family, LLaVA's own among them
    # transformers' Qwen2 and Gemma use LLaMA's tensor names: one pair of rename functions serves the three
    from_hf: Callable[[StateDict], StateDict] = llama_from_hf
    to_hf: Callable[[StateDict], StateDict] = llama_to_hf


# the registry: a new family is its module (its LanguageModel, config and config reader) and a line here
FAMILIES: tuple[Family, ...] = (
    Family(Llama, llama_config_from_hf, ("llama", "llava_llama")),
    # Qwen2-VL / Qwen2.5-VL's decoders are Qwen2's with multimodal RoPE (their text_config's model_types)
    Family(Qwen2, qwen2_config_from_hf, ("qwen2", "llava_qwen", "qwen2_vl_text", "qwen2_5_vl_text")),
    Family(Gemma, gemma_config_from_hf, ("gemma",)),
)


def preset(name: str, **overrides: Any) -> tuple[type[LanguageModel], DecoderConfig]:
    """The family and config of the preset ``name``, its fields changed by ``overrides``."""
    for family in FAMILIES:
        if name in family.model.config_class.presets:
            return family.model, family.model.config_class.from_name(name, **overrides)
    names = sorted(n for family in FAMILIES for n in family.model.config_class.presets)
    raise ValueError(f"unknown LLM preset {name!r}; valid presets: {names}")


def family_of(llm: LanguageModel, source: str) -> Family:
    entry = next((e for e in FAMILIES if type(llm) is e.model), None)
    if entry is None:
        raise ValueError(f"{source}: flexvlm reads no transformers checkpoint into a {type(llm).__name__}; register "
                         f"its family in flexvlm.models.families.FAMILIES")
    return entry


def decoder_config_from_hf(hf: dict, source: str = "config.json") -> tuple[type[LanguageModel], DecoderConfig]:
    """The family (by `model_type`; LLaMA when there is none, as in LLaVA-1.5's configs) and the config
    of a transformers / LLaVA config.json's decoder."""
    model_type = hf.get("model_type", "llama")
    for entry in FAMILIES:
        if model_type in entry.model_types:
            return entry.model, entry.config_from_hf(hf, source)
    known = [t for entry in FAMILIES for t in entry.model_types]
    raise ValueError(f"{source}: config.json model_type {model_type!r} is no decoder family flexvlm implements "
                     f"({', '.join(known)})")


# (mrope_section: a field of the Qwen2 family's config only)
_SHAPELESS_DECODER_SETTINGS = ("rms_norm_eps", "rope_theta", "tie_word_embeddings", "mrope_section")


def _check_decoder_config(entry: Family, llm: LanguageModel, hf: dict, source: str) -> None:
    """The checkpoint's family, and settings that no tensor shape reveals: a wrong one gives silently
    wrong logits."""
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in entry.model_types:
        raise_mismatches([f"model_type {model_type!r}: the model's decoder is {type(llm).__name__}"], source,
                          "language model (llm)")
    found = entry.config_from_hf(hf, source)
    problems = [
        f"{k}: checkpoint {getattr(found, k, None)} vs model {getattr(llm.config, k, None)}"
        for k in _SHAPELESS_DECODER_SETTINGS if getattr(found, k, None) != getattr(llm.config, k, None)
    ]
    raise_mismatches(problems, source, "language model (llm / llm_overrides)")


def high_res_copies(names: Iterable[str], state: StateDict) -> StateDict:
    """The W_K', W_V' among ``names`` (a model's parameter names) that ``state`` lacks (a LLaMA
    checkpoint, or a run without FlexAttention in that layer): they start as the same layer's
    loaded W_K, W_V (the paper's initialisation)."""
    return {
        name: state[source]
        for name in names
        if "_hr_proj." in name and name not in state and (source := name.replace("_hr_proj.", "_proj.")) in state
    }


def load_decoder_state(llm: LanguageModel, state: StateDict, source: str, hf_config: dict) -> None:
    entry = family_of(llm, source)
    if hf_config:
        _check_decoder_config(entry, llm, hf_config, source)
    names = llm.state_dict()
    # the release saves W_K' / W_V' in every layer but uses them from N_SA on: the layers this model
    # keeps plain have no use for them
    state = {k: v for k, v in entry.from_hf(state).items() if "_hr_proj." not in k or k in names}
    if llm.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied: saved once
    load_state_dict_strict(llm, {**state, **high_res_copies(names, state)}, source)


def load_llm_weights(llm: LanguageModel, path: str | Path) -> None:
    """A transformers LLaMA / Vicuna / Qwen2 / Gemma folder (`save_pretrained`) or weights file into `llm`."""
    load_decoder_state(llm, read_checkpoint(path), str(path), read_config(path))
