"""VLM architectures, one package each, and the registry that builds a FlexVLM from a checkpoint
folder of any of them (``from_pretrained``). A package holds what its architecture needs: its
config.json read as FlexVLM's arguments, its weight layouts, its preprocessing. The architecture of a
folder is told from its config.json, never from its name. LLaVA-1.5, SmolVLM / Idefics3 and LLaVA-OneVision
and Qwen2-VL / Qwen2.5-VL (``qwen2_vl``) build in the four modes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flexvlm.architectures import llava15, llava_onevision, qwen2_vl, smolvlm
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import SelectionStrategy
from flexvlm.weights import read_model_config

__all__ = ["ARCHITECTURES", "Architecture", "PretrainedFlexVLM", "architecture_of", "from_pretrained"]


@dataclass(frozen=True)
class Architecture:
    name: str
    recognises: Callable[[dict], bool]  # whether a config.json is this architecture's
    # (folder, vision tower folder or None, FlexVLM arguments that replace the folder's) -> FlexVLM's arguments
    arguments: Callable[..., dict[str, Any]]


# the registry: a new architecture is its package and a line here
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llava-1.5", llava15.recognises, llava15.arguments_from_llava),
    Architecture("smolvlm", smolvlm.recognises, smolvlm.arguments),
    Architecture("llava-onevision", llava_onevision.recognises, llava_onevision.arguments),
    Architecture("qwen2-vl", qwen2_vl.recognises, qwen2_vl.arguments),
)


def architecture_of(folder: str | Path) -> Architecture:
    """The architecture of a checkpoint folder, read from its config.json."""
    config = read_model_config(folder)
    found = next((a for a in ARCHITECTURES if a.recognises(config)), None)
    if found is None:
        raise ValueError(f"{folder}: config.json (model_type {config.get('model_type')!r}, architectures "
                         f"{config.get('architectures')}) is no architecture flexvlm builds; it builds "
                         f"{', '.join(a.name for a in ARCHITECTURES)}")
    return found


def from_pretrained(folder: str | Path, vision: str | None = None, **overrides: Any) -> FlexVLM:
    """A FlexVLM built from a local checkpoint folder's own config.json and loaded with its weights
    (LLaVA-1.5: llava-hf, the original layout with its tower ``vision``, by default
    ``mm_vision_tower`` if that is a local folder, the authors' released FlexAttention checkpoint,
    what ``flexvlm export`` writes). ``overrides``: FlexVLM arguments that replace what the folder
    implies (``mode``, ``num_sa_layers``, ``selection``...)."""
    return FlexVLM(**architecture_of(folder).arguments(folder, vision, **overrides))


class PretrainedFlexVLM(FlexVLM):
    """``from_pretrained`` as a class, so that a config builds a model from a checkpoint folder::

        model:
          model:
            class_path: flexvlm.architectures.PretrainedFlexVLM
            init_args:
              checkpoint: /path/to/llava-v1.5-7b-flexattn
              vision: /path/to/clip-vit-large-patch14-336

    ``mode``, ``num_sa_layers``, ``selection``, ``zoom`` and ``high_res_path`` default to the
    checkpoint's (the release's ``extra`` settings, what ``flexvlm.export`` wrote, or FlexVLM's
    defaults without them); the other arguments are FlexVLM's."""

    def __init__(
        self,
        checkpoint: str,
        vision: str | None = None,
        mode: str | None = None,
        num_sa_layers: int | None = None,
        selection: SelectionStrategy | str | None = None,
        zoom: int | None = None,
        high_res_path: str | None = None,
        high_res_grad: bool = False,
        gradient_checkpointing: bool = False,
        flex_impl: str = "fused",
    ) -> None:
        given = {"mode": mode, "high_res_path": high_res_path, "num_sa_layers": num_sa_layers,
                 "selection": selection, "zoom": zoom}
        super().__init__(**architecture_of(checkpoint).arguments(
            checkpoint, vision, high_res_grad=high_res_grad, gradient_checkpointing=gradient_checkpointing,
            flex_impl=flex_impl, **{k: v for k, v in given.items() if v is not None},
        ))
