"""Qwen2-VL / Qwen2.5-VL images as FlexVLM places them (``QwenEncoder``): the vision tower (its merger included,
which already projects to the decoder's width: FlexVLM's projector is the identity) runs on the images of the
mode's resolution, and each image's merged tokens, row-major on its grid, replace its run of pad tokens.

| mode              | in the sequence                                                   | high-res keys          |
|-------------------|-------------------------------------------------------------------|------------------------|
| `hd`              | each image at its native resolution (the processor's max_pixels)  | -                      |
| `lr_only`         | each image at the reduced one (max_pixels // zoom^2)              | -                      |
| `xattn`, `flex`   | the image at the reduced resolution                               | its native tokens      |

``hd`` and ``lr_only`` are the original model, at one resolution or the other: its prompt (one pad token per
merged token, as the processor expands it for that resolution's grids) and its multimodal RoPE positions
(``positions.rope_index``). In ``xattn`` / ``flex`` the prompt is ``lr_only``'s and the native image's merged
tokens, row-major on its grid, are the high-res keys, at the positions of their low-res cell scaled to the
high-res grid (``positions.high_res_positions``). FlexVLM has one low-res grid a batch, so these modes take one
image a sample and a batch whose reduced grids are the same (images of one aspect ratio, or all under the
reduced budget's rounding alike).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flexvlm.architectures.qwen2_vl.positions import high_res_positions, rope_index
from flexvlm.architectures.qwen2_vl.preprocess import (
    QwenImageBatch, QwenVLProcessing, num_image_tokens, reduced_processing,
)
from flexvlm.architectures.qwen2_vl.vision import QwenVisionTower
from flexvlm.models.decoder import PromptPositions
from flexvlm.models.encoder import EncodedImages, VisualEncoder
from flexvlm.models.geometry import Shape, VisualLayout, on_canvas, uniform_cells
from flexvlm.weights import raise_mismatches

__all__ = ["DEFAULT_ZOOM", "MODES", "QwenEncoder"]

MODES = ("lr_only", "hd", "xattn", "flex")
HIGH_RES_MODES = ("xattn", "flex")  # the reduced image in the sequence, the native one's tokens beside it
DEFAULT_ZOOM = 2  # the reduced resolution's side: about half the native one, a quarter of its tokens


class QwenEncoder(VisualEncoder):
    """The tower's merged tokens of ``QwenImageBatch`` images (module docstring). ``processing``: the image
    settings the images were made with, which must cut the patches the tower takes; ``zoom``: how much smaller a
    side the reduced resolution is (``preprocess.reduced_processing``)."""

    def __init__(self, tower: QwenVisionTower, processing: QwenVLProcessing, zoom: int = DEFAULT_ZOOM) -> None:
        super().__init__()
        s = tower.settings
        problems = [f"{name} {ours}: the tower's is {theirs}" for name, ours, theirs in (
            ("patch_size", processing.patch_size, s.patch_size),
            ("temporal_patch_size", processing.temporal_patch_size, s.temporal_patch_size),
            ("merge_size", processing.merge_size, s.merge_size),
        ) if ours != theirs]
        raise_mismatches(problems, "Qwen2-VL image settings", "vision tower")
        self.tower, self.processing, self.zoom = tower, processing, zoom
        self.reduced = reduced_processing(processing, zoom)  # lr_only's image settings (and a check of zoom)
        self.feature_dim = s.out_width  # the merger's output: the decoder's width already
        # the tower's patch embedding and blocks stay as loaded, as the paper keeps its tower; the merger, the part
        # that maps to the decoder (LLaVA's projector), trains
        for module in (tower.patch_embed, tower.blocks):
            module.requires_grad_(False)

    @property
    def lr_shape(self) -> Shape:
        raise NotImplementedError("a Qwen2-VL image's low-res grid is its own (its reduced grid_thw), a batch's is "
                                  "its layout's (xattn / flex); lr_only's selecting maps (map_grad) are not wired")

    def encode(self, images: QwenImageBatch, project: Callable[[Tensor], Tensor], mode: str,
               content_box: Tensor | None = None) -> EncodedImages:
        """Each sample's images' tokens at the mode's resolution, in order, padded to the batch's most."""
        self._check(images, mode, content_box)
        if mode in HIGH_RES_MODES:
            return self._with_high_res(images, project)
        packed = images.at(mode)
        tokens = project(self.tower(packed.pixel_values, packed.grid_thw))
        per_image = [num_image_tokens(g, self.processing.merge_size) for g in packed.grid_thw.tolist()]
        per_sample, start = [], 0
        for count in images.images_per_sample:
            per_sample.append(sum(per_image[start:start + count]))
            start += count
        samples = tokens.split(per_sample)
        in_sequence = torch.nn.utils.rnn.pad_sequence(list(samples), batch_first=True)
        counts = None if len(set(per_sample)) == 1 else torch.tensor(per_sample, device=tokens.device)
        return EncodedImages(in_sequence, counts)

    def prompt_positions(self, images: QwenImageBatch, mode: str, image_mask: Tensor,
                         attention_mask: Tensor) -> PromptPositions:
        """The multimodal RoPE positions of the prompt whose image tokens ``image_mask`` marks, the images at the
        mode's resolution."""
        ids, deltas = rope_index(image_mask, images.at(mode).grid_thw, self.processing.merge_size, attention_mask)
        return PromptPositions(ids, deltas)

    def high_res_positions(self, prompt_positions: Tensor, lr_index: Tensor, layout: VisualLayout) -> Tensor:
        """The high-res keys' positions: their low-res cell's, scaled to the high-res grid."""
        lr_positions = prompt_positions.gather(2, lr_index[None].expand(3, -1, -1).to(prompt_positions.device))
        return high_res_positions(lr_positions, layout)

    def _with_high_res(self, images: QwenImageBatch, project: Callable[[Tensor], Tensor]) -> EncodedImages:
        """Each sample's one image: its reduced tokens in the sequence, its native ones on the batch's canvas."""
        m, batch = self.processing.merge_size, len(images.images_per_sample)
        reduced = {tuple(g) for g in images.reduced.grid_thw.tolist()}
        problems = []
        if any(count != 1 for count in images.images_per_sample):
            problems.append(f"images per sample {list(images.images_per_sample)}: xattn / flex place one image's "
                            f"reduced tokens in the sequence and its native ones beside it")
        elif len(reduced) != 1:
            problems.append(f"reduced grids {sorted(reduced)}: FlexVLM has one low-res grid a batch")
        elif images.native.grid_thw[:, 0].ne(1).any() or next(iter(reduced))[0] != 1:
            problems.append("a clip: xattn / flex take still images")
        if problems:
            raise ValueError("; ".join(problems) + "; use mode hd or lr_only for such a batch")
        _, h, w = next(iter(reduced))
        low = project(self.tower(images.reduced.pixel_values, images.reduced.grid_thw))
        high = project(self.tower(images.native.pixel_values, images.native.grid_thw))
        sizes = images.native.grid_thw[:, 1:].to(high.device) // m  # (B, 2): each native merged grid
        grids = [t.view(rows, cols, -1) for t, (rows, cols) in zip(high.split(sizes.prod(-1).tolist()), sizes.tolist())]
        canvas = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
        # both resolutions show the whole image, resized, with no padding: low-res row a of the h / m shows the
        # image's rows [a m / h, (a + 1) m / h), native row i of H_b rows [i / H_b, (i + 1) / H_b), which start in
        # low-res row floor(i (h / m) / H_b): the even mapping (smart_resize's rounding to multiples of 28 px changes
        # the aspect ratio by under a token)
        cells = uniform_cells(sizes, canvas, (h // m, w // m))
        valid = torch.ones(batch, h // m, w // m, dtype=torch.bool, device=high.device)
        layout = VisualLayout((h // m, w // m), sizes, cells, valid, cells >= 0)
        return EncodedImages(low.view(batch, -1, low.shape[-1]), None, high_res=on_canvas(grids, canvas),
                             layout=layout)

    def image_processor(self, mode: str) -> None:
        raise NotImplementedError("Qwen2-VL / Qwen2.5-VL images through flexvlm's data pipeline are not wired yet: "
                                  "give the model QwenImageBatch batches (preprocess.batch_samples)")

    def _check(self, images: QwenImageBatch, mode: str, content_box: Tensor | None) -> None:
        if not isinstance(images, QwenImageBatch):
            raise TypeError(f"QwenEncoder encodes a QwenImageBatch (flexvlm.architectures.qwen2_vl.preprocess."
                            f"batch_samples), got {type(images).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if content_box is not None:
            raise ValueError("a Qwen2-VL image is resized whole, with no padding of its own: content_box must be None")
        if sum(images.images_per_sample) != len(images.at(mode).grid_thw):
            raise ValueError(f"the samples hold {sum(images.images_per_sample)} images, grid_thw "
                             f"{len(images.at(mode).grid_thw)}")
