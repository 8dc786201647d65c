"""LLaVA-OneVision's weights (transformers' ``LlavaOnevisionForConditionalGeneration``) into a FlexVLM
built by ``config.arguments``: strictly, every missing, unexpected or mis-shaped tensor named with the
folder, and the model's settings that no shape reveals checked against the folder's config.json.

Two layouts of tensor names exist, and the files on disk hold either:

- the original one (the hub's llava-hf folders, transformers 4.x before its VLM refactor, and what
  transformers 5.24's ``save_pretrained`` writes: it saves in the original layout, reversing its
  conversion mapping): ``language_model.model.*``, ``language_model.lm_head.*``,
  ``multi_modal_projector.*``, ``vision_tower.vision_model.*`` (5.24: ``vision_tower.*``, the
  SiglipVisionModel without its ``vision_model`` level), ``image_newline``;
- transformers' module tree (4.52+ ``save_pretrained``, and 5.x in memory): ``model.language_model.*``,
  ``lm_head.*``, ``model.multi_modal_projector.*``, ``model.vision_tower[.vision_model].*``,
  ``model.image_newline``.

transformers 5.24 reads the first through its conversion mapping (``llava_onevision`` -> ``llava_next``:
``^language_model.lm_head`` -> ``lm_head``, ``^language_model`` -> ``model.language_model``, then
``LlavaOnevisionModel`` -> ``LlavaModel``: ``^language_model.model`` -> ``language_model``;
``^vision_tower``, ``^multi_modal_projector``, ``^image_newline`` under ``model.``; SiglipVisionModel:
``vision_model.`` dropped), to the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexvlm.architectures.llava_onevision.settings import settings_from_config
from flexvlm.models.clip import feature_block
from flexvlm.models.families import load_decoder_state
from flexvlm.models.siglip import load_siglip
from flexvlm.models.vlm import FlexVLM, WeightLoader
from flexvlm.weights import (
    StateDict, load_state_dict_strict, raise_mismatches, read_checkpoint, read_config, take_parts,
)

__all__ = ["ONEVISION_LAYOUTS", "OneVisionLayoutOfNames", "OneVisionWeights", "load_onevision"]


@dataclass(frozen=True)
class OneVisionLayoutOfNames:
    name: str
    marker: str  # the projector's prefix, found in no other layout
    prefixes: dict[str, tuple[str, str]]  # checkpoint prefix -> (part, flexvlm prefix)


ONEVISION_LAYOUTS = (
    OneVisionLayoutOfNames("original layout (llava-hf hub, transformers 4.x, transformers 5 save_pretrained)",
                           "multi_modal_projector.", {
        "language_model.model.": ("llm", "model."), "language_model.lm_head.": ("llm", "lm_head."),
        "multi_modal_projector.linear_1.": ("projector", "0."), "multi_modal_projector.linear_2.": ("projector", "2."),
        "vision_tower.": ("vision", ""), "image_newline": ("newline", "weight"),
    }),
    OneVisionLayoutOfNames("transformers' module tree (4.52+ save_pretrained, 5.x in memory)",
                           "model.multi_modal_projector.", {
        "model.language_model.": ("llm", "model."), "lm_head.": ("llm", "lm_head."),
        "model.multi_modal_projector.linear_1.": ("projector", "0."),
        "model.multi_modal_projector.linear_2.": ("projector", "2."),
        "model.vision_tower.": ("vision", ""), "model.image_newline": ("newline", "weight"),
    }),
)


def _names_layout(state: StateDict, source: str) -> OneVisionLayoutOfNames:
    found = [layout for layout in ONEVISION_LAYOUTS if any(k.startswith(layout.marker) for k in state)]
    if len(found) != 1:
        what = "both " if found else "no "
        markers = " and ".join(layout.marker + "*" for layout in ONEVISION_LAYOUTS)
        raise ValueError(f"{source} holds {what}LLaVA-OneVision projector ({markers}): expected the tensors of one "
                         f"layout of LlavaOnevisionForConditionalGeneration")
    return found[0]


def _vision_prefix(vision: StateDict, source: str) -> str:
    """``vision_model.`` (the hub, 4.x) or none (transformers 5's SiglipVisionModel), for all the tower's tensors."""
    nested = [k.startswith("vision_model.") for k in vision]
    if any(nested) and not all(nested):
        flat = [k for k, n in zip(vision, nested) if not n][:5]
        raise ValueError(f"{source}: the vision tower's tensors are under vision_model. and beside it ({flat}...)")
    return "vision_model." if any(nested) else ""


def _check_model(model: FlexVLM, config: dict, source: str) -> None:
    """The model's settings that no tensor shape reveals, against the folder's config.json."""
    settings = settings_from_config(config, source)
    encoder = model.encoder
    geometry = getattr(encoder, "geometry", None)
    tower = getattr(encoder, "tower", None)
    if geometry is None or tower is None:
        raise TypeError(f"{source}: LLaVA-OneVision weights load into a FlexVLM with an AnyresEncoder, got "
                        f"{type(encoder).__name__}")
    problems = []
    if geometry.pinpoints != settings.pinpoints:
        problems.append(f"image_grid_pinpoints {[list(p) for p in settings.pinpoints]} vs model "
                        f"{[list(p) for p in geometry.pinpoints]}")
    if geometry.max_views != settings.max_views:
        problems.append(f"vision_aspect_ratio anyres_max_{settings.max_views} vs model anyres_max_{geometry.max_views}")
    depth = getattr(tower, "depth", None)
    if depth is not None and getattr(tower, "block_index", None) != feature_block(settings.feature_layer, depth):
        problems.append(f"vision_feature_layer {settings.feature_layer}: the model's tower reads block "
                        f"{tower.block_index} of {depth}")
    if getattr(tower, "final_norm", False):
        problems.append("the model's tower applies post_layernorm; LLaVA-OneVision reads hidden_states before it")
    raise_mismatches(problems, source, "model (its AnyresEncoder)")


def load_onevision(model: FlexVLM, path: str | Path) -> None:
    """A LLaVA-OneVision folder into ``model`` (built by ``config.arguments``): the decoder (W_K', W_V'
    that the folder lacks start as W_K, W_V), the projector, the SigLIP tower, ``image_newline``."""
    source = str(path)
    state, config = read_checkpoint(path), read_config(path)
    _check_model(model, config, source)
    layout = _names_layout(state, source)
    parts = take_parts(state, layout.prefixes, f"{source} ({layout.name})")
    load_decoder_state(model.llm, parts["llm"], source, settings_from_config(config, source).text_config)
    load_state_dict_strict(model.projector, parts["projector"], f"{source} (multi_modal_projector)")
    vision = parts["vision"]
    load_siglip(model.encoder.tower, vision, _vision_prefix(vision, source), f"{source} (vision_tower)")
    load_state_dict_strict(model.encoder.newline, parts["newline"], f"{source} (image_newline)")


class OneVisionWeights(WeightLoader):
    """A LLaVA-OneVision folder as a FlexVLM's ``pretrained`` weights (``config.arguments`` names it)."""

    def __init__(self, folder: str) -> None:
        self.folder = str(folder)

    def apply(self, model: FlexVLM) -> None:
        load_onevision(model, self.folder)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r})"
