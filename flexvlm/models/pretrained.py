"""``FlexVLM.from_pretrained`` as a class, so that a config builds a model from a checkpoint folder."""

from __future__ import annotations

from flexvlm.checkpoints import arguments_from_llava
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import SelectionStrategy

__all__ = ["PretrainedFlexVLM"]


class PretrainedFlexVLM(FlexVLM):
    """A FlexVLM built from a local LLaVA-1.5 folder's own config.json and loaded with its weights
    (``FlexVLM.from_pretrained``), for a YAML::

        model:
          model:
            class_path: flexvlm.models.pretrained.PretrainedFlexVLM
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
        given = {"mode": mode, "high_res_path": high_res_path}
        super().__init__(**arguments_from_llava(
            checkpoint, vision, num_sa_layers=num_sa_layers, selection=selection, zoom=zoom,
            high_res_grad=high_res_grad, gradient_checkpointing=gradient_checkpointing, flex_impl=flex_impl,
            **{k: v for k, v in given.items() if v is not None},
        ))
