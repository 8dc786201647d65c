"""LLaVA-1.5's weights: its two checkpoint layouts (llava-hf's, the original one, which the authors'
released FlexAttention checkpoint extends with W_K' / W_V'), the projector file, and the local
weights a FlexVLM starts from (`PretrainedWeights`). Every load is strict, and config.json settings
that no shape reveals (the feature layer) are checked against the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flexvlm.models.clip import clip_vision_from_hf, load_clip_vision, load_vision_state
from flexvlm.models.families import load_decoder_state, load_llm_weights
from flexvlm.models.vlm import FlexVLM, WeightLoader
from flexvlm.weights import (
    StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_config, take_parts,
)


_PROJECTOR_PREFIXES = {prefix: ("projector", "") for prefix in ("model.mm_projector.", "mm_projector.", "")}


def load_projector(projector: nn.Module, path: str | Path) -> None:
    """A LLaVA projector file (e.g. the pre-training stage's `mm_projector.bin`)."""
    parts = take_parts(read_checkpoint(path), _PROJECTOR_PREFIXES, str(path))
    load_state_dict_strict(projector, parts["projector"], str(path))


@dataclass(frozen=True)
class LlavaLayout:
    name: str
    markers: tuple[str, ...]  # name prefixes of its projector, found in no other layout
    prefixes: dict[str, tuple[str, str]]  # checkpoint prefix -> (part, flexvlm prefix)
    feature_layer_key: str
    select_key: str
    patch_only: str  # the select value that keeps patch tokens only, as flexvlm does


LLAVA_LAYOUTS = (
    LlavaLayout(
        "llava-hf (LlavaForConditionalGeneration)", ("multi_modal_projector.", "model.multi_modal_projector."),
        {
            # files on disk; the second spelling is transformers' in-memory module tree
            "language_model.model.": ("llm", "model."), "language_model.lm_head.": ("llm", "lm_head."),
            "model.language_model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
            "multi_modal_projector.linear_1.": ("projector", "0."),
            "multi_modal_projector.linear_2.": ("projector", "2."),
            "model.multi_modal_projector.linear_1.": ("projector", "0."),
            "model.multi_modal_projector.linear_2.": ("projector", "2."),
            "vision_tower.": ("vision", ""), "model.vision_tower.": ("vision", ""),
        },
        "vision_feature_layer", "vision_feature_select_strategy", "default",
    ),
    LlavaLayout(
        "original LLaVA (LlavaLlamaForCausalLM)", ("model.mm_projector.",),
        {
            "model.mm_projector.": ("projector", ""), "model.vision_tower.vision_tower.": ("vision", ""),
            "model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
        },
        "mm_vision_select_layer", "mm_vision_select_feature", "patch",
    ),
)


LLAVA_HF_LAYOUT, ORIGINAL_LLAVA_LAYOUT = LLAVA_LAYOUTS  # by name, for the writer (`flexvlm.export`)


def _llava_layout(state: StateDict, source: str) -> LlavaLayout:
    for layout in LLAVA_LAYOUTS:
        if any(k.startswith(layout.markers) for k in state):
            return layout
    raise ValueError(
        f"{source} is not a LLaVA checkpoint: no multimodal projector (multi_modal_projector.* or "
        f"model.mm_projector.*); for a language model alone use PretrainedWeights(llm=...)"
    )


def load_llava(model: FlexVLM, path: str | Path, vision: str | Path | None = None) -> None:
    """A LLaVA-1.5 folder into `model`: the llava-hf layout (language model, projector, CLIP tower)
    or the original one (LLaMA names plus `model.mm_projector.*`; the tower is a separate folder,
    `vision`, which also replaces a tower held in `path`)."""
    source = str(path)
    state, config = read_checkpoint(path), read_config(path)
    layout = _llava_layout(state, source)
    select = config.get(layout.select_key, layout.patch_only)
    if select != layout.patch_only:
        raise_mismatches([f"{layout.select_key} {select!r}: flexvlm feeds patch tokens only ({layout.patch_only!r})"],
                          source, "model")
    parts = take_parts(state, layout.prefixes, f"{source} ({layout.name})")
    load_decoder_state(model.llm, parts["llm"], source, config.get("text_config", config))
    load_state_dict_strict(model.projector, parts["projector"], source)
    feature_layer = config.get(layout.feature_layer_key, -2)
    if vision is not None:
        load_clip_vision(model.encoder.backbone, vision, feature_layer)
    elif parts["vision"]:
        vision_state = clip_vision_from_hf(parts["vision"])
        load_vision_state(model.encoder.backbone, vision_state, source, config.get("vision_config"), feature_layer)
    else:
        raise ValueError(
            f"{source} ({layout.name}) holds no vision tower (its config names "
            f"{config.get('mm_vision_tower')!r}); give the local CLIP folder as `vision`"
        )


class PretrainedWeights(WeightLoader):
    """Which local weights a FlexVLM starts from; a config names it as `FlexVLM(pretrained=...)`.

    `llava`: a LLaVA-1.5 folder (either layout); `llm`: a decoder folder instead of it (LLaMA / Vicuna,
    Qwen2 or Gemma, as transformers' `save_pretrained` writes it, into a decoder of that family);
    `vision`: a CLIP folder or state dict file (needed with the original LLaVA layout);
    `projector`: a projector file (e.g. `mm_projector.bin`), loaded last.
    """

    def __init__(
        self,
        llava: str | None = None,
        llm: str | None = None,
        vision: str | None = None,
        projector: str | None = None,
    ) -> None:
        if llava is not None and llm is not None:
            raise ValueError("give `llava` or `llm`, not both: a LLaVA checkpoint holds the language model")
        self.llava, self.llm, self.vision, self.projector = llava, llm, vision, projector

    def apply(self, model: FlexVLM) -> None:
        """Load what is given; W_K', W_V' that the language model's checkpoint lacks start as its
        W_K, W_V (those it holds, as in the authors' released checkpoint, are loaded)."""
        if self.llava is not None:
            load_llava(model, self.llava, self.vision)
        else:
            if self.llm is not None:
                load_llm_weights(model.llm, self.llm)
            if self.vision is not None:
                load_clip_vision(model.encoder.backbone, self.vision)
        if self.projector is not None:
            load_projector(model.projector, self.projector)
