"""From images to the tokens a FlexVLM places: the ``VisualEncoder`` interface an architecture
implements, and LLaVA-1.5's, the dual-path encoder (a low-res view in the sequence, a high-res token
grid beside it)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.models.geometry import Shape, VisualLayout, square_layout
from flexvlm.models.vision import VisionBackbone
from flexvlm.selection.base import MARGIN_RULES, valid_grid

if TYPE_CHECKING:  # the model hands a reduction in; the encoder only calls it
    from flexvlm.models.decoder import PromptPositions
    from flexvlm.reduction import ImageTokenReduction

__all__ = ["DualPathEncoder", "EncodedImages", "HIGH_RES_PATHS", "VisualEncoder"]

HIGH_RES_PATHS = ("crops", "whole")


@dataclass
class EncodedImages:
    """A batch's images as the decoder takes them, for one mode (``FlexVLM``'s table)."""

    in_sequence: Tensor  # (B, n, D) projected tokens that replace the image placeholders of the prompt
    counts: Tensor | None  # (B,) real tokens of ``in_sequence`` per sample; None: all n
    high_res: Tensor | None = None  # (B, H*W, D) projected high-res tokens on the layout's canvas (xattn, flex)
    layout: VisualLayout | None = None  # their geometry (xattn, flex)
    lr_features: Tensor | None = None  # the tower's features before the projector, where an objective reads them
    hr_features: Tensor | None = None
    kept_fraction: Tensor | None = None  # (B,) after a reduction before the decoder: the share of hd's image
    # tokens in the sequence


class VisualEncoder(nn.Module, ABC):
    """An architecture's way from its image batch to tokens. In ``lr_only``, ``xattn`` and ``flex``
    the sequence holds the low-res view, its ``lr_shape`` grid contiguous and row-major from the first
    image token; in ``hd`` everything the original model puts there. The projector (``FlexVLM``'s
    part) is handed in, since some architectures project each view before arranging the views."""

    feature_dim: int  # width of the features the projector takes (``grid_features``' width)

    @property
    @abstractmethod
    def lr_shape(self) -> Shape:
        """(h, w) of the low-res grid in the sequence."""

    @abstractmethod
    def encode(self, images: Any, project: Callable[[Tensor], Tensor], mode: str,
               content_box: Tensor | None = None) -> EncodedImages:
        """The tokens of ``images`` for ``mode``; the high-res tokens and their layout in xattn and flex."""

    def grid_features(self, images: Any) -> tuple[Tensor, Tensor]:
        """The features before the projector, row-major on the low-res grid (B, h*w, C) and on the
        high-res canvas (B, H*W, C): what an auxiliary objective reads (``EncodedImages`` carries them
        where a mode computes them anyway)."""
        raise NotImplementedError(f"{type(self).__name__} gives no grid features")

    def placeholder_tokens(self, mode: str) -> int:
        """Sequence positions one image placeholder of a prompt stands for: 1 where the prompt holds a
        placeholder per image token (the architecture's processor expands them)."""
        return 1

    def prompt_positions(self, images: Any, mode: str, image_mask: Tensor,
                         attention_mask: Tensor) -> PromptPositions | None:
        """The decoder's position ids of a spliced prompt ((B, N) ``image_mask``: its image tokens), where the
        architecture places image tokens by positions of its own (Qwen2-VL's multimodal RoPE); None: the
        decoder counts the real tokens."""
        return None

    def high_res_positions(self, prompt_positions: Tensor, lr_index: Tensor, layout: VisualLayout) -> Tensor:
        """The decoder's position ids of the high-res keys on the layout's canvas, (3, B, H*W), where
        ``prompt_positions`` (3, B, N) are the architecture's own (``prompt_positions``); ``lr_index`` (B, h*w):
        the low-res grid's tokens in the sequence."""
        raise NotImplementedError(f"{type(self).__name__} gives no positions of its own to its high-res keys")

    def reduced_tokens(self, reduction: ImageTokenReduction) -> int:
        """Sequence positions one image placeholder stands for in ``hd`` after ``reduction``, a reduction of
        the image tokens before the decoder (``flexvlm.reduction``, e.g. VisionZip); refused (ValueError)
        where this encoder's tower passes cannot give what it reads."""
        raise ValueError(f"{reduction.describe()} reduces LLaVA-1.5's dual-path tokens (a backbone's crops); "
                         f"{type(self).__name__} lays out its own views, which it does not reduce")

    def encode_reduced(self, images: Any, project: Callable[[Tensor], Tensor],
                       reduction: ImageTokenReduction) -> EncodedImages:
        """hd's tokens after ``reduction``: ``reduced_tokens`` of them an image."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce its image tokens")

    @property
    def input_size(self) -> int | None:
        """The side of the square images the encoder takes; None when its preprocessing sizes them."""
        return None

    def image_processor(self, mode: str) -> Any:
        """The data pipeline's image processor for ``mode`` (a ``flexvlm.data.visuals.ImageProcessor``:
        what a sample's image becomes, how samples batch, the prompt's image ids), or None: LLaVA-1.5's
        square images, which the datamodule makes itself."""
        return None


class DualPathEncoder(VisualEncoder):
    """Encodes a normalised, square-padded image (B, 3, S, S), S = zoom * backbone.image_size.

    Low-res: the image resized to the backbone's native size -> g x g tokens.
    High-res: (zoom * g) x (zoom * g) tokens, either from zoom x zoom native-size crops stitched
    back row-major ("crops", the paper) or from one pass over the whole image with resampled
    position embeddings ("whole"). The high-res path runs without gradient unless
    `high_res_grad` (the paper freezes it; small models trained from scratch need it).
    """

    def __init__(
        self,
        backbone: VisionBackbone,
        zoom: int = 3,
        high_res_path: str = "crops",
        high_res_grad: bool = False,
        margin_rule: str = "centre",
    ) -> None:
        """``margin_rule``: which low-res cells of a padded image count as border, out of the selecting
        maps (``flexvlm.selection.valid_grid``)."""
        super().__init__()
        if margin_rule not in MARGIN_RULES:
            raise ValueError(f"unknown margin_rule {margin_rule!r}; valid: {list(MARGIN_RULES)}")
        if high_res_path not in HIGH_RES_PATHS:
            raise ValueError(f"unknown high_res_path {high_res_path!r}; valid: {', '.join(HIGH_RES_PATHS)}")
        if zoom < 1:
            raise ValueError(f"zoom must be >= 1, got {zoom}")
        if backbone.image_size % backbone.patch_size:
            # otherwise crops and the whole image would give different grids
            raise ValueError(
                f"backbone image size {backbone.image_size} is not a multiple of its patch size {backbone.patch_size}"
            )
        self.backbone = backbone
        self.zoom = zoom
        self.high_res_path = high_res_path
        self.high_res_grad = high_res_grad
        self.margin_rule = margin_rule
        self.feature_dim = backbone.embed_dim
        self.lr_grid = backbone.grid_size
        self.hr_grid = zoom * self.lr_grid
        self.high_res_size = zoom * backbone.image_size

    @property
    def lr_shape(self) -> Shape:
        return (self.lr_grid, self.lr_grid)

    @property
    def input_size(self) -> int:
        return self.high_res_size

    def placeholder_tokens(self, mode: str) -> int:
        """LLaVA's prompt holds one ``<image>`` that the image's tokens replace."""
        return (self.hr_grid if mode == "hd" else self.lr_grid) ** 2

    def grid_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(low-res tokens (B, g*g, C), high-res tokens (B, (zoom*g)^2, C))."""
        return self.encode_low_res(images), self.encode_high_res(images)

    def reduced_tokens(self, reduction: ImageTokenReduction) -> int:
        """Each of the high-res path's tower passes (zoom^2 crops, or the whole image) is reduced on its own,
        from its class token where the tower has one, as VisionZip does with LLaVA-NeXT's sub-images."""
        refusal = self.backbone.attention_refusal()
        if refusal is not None:
            raise ValueError(f"{reduction.describe()} reads the attention of the vision tower's layer whose output "
                             f"the model uses: {refusal}")
        crops = 1 if self.high_res_path == "whole" else self.zoom**2
        return crops * reduction.pass_tokens(self.hr_grid**2 // crops, self.backbone.has_class_token)

    def encode_reduced(self, images: Tensor, project: Callable[[Tensor], Tensor],
                       reduction: ImageTokenReduction) -> EncodedImages:
        self._check_size(images)
        whole = self.high_res_path == "whole"
        with contextlib.nullcontext() if self.high_res_grad else torch.no_grad():
            attention = self.backbone.token_attention(images if whole else self._crops(images))
        tokens = reduction.reduce(attention, 1 if whole else self.zoom)
        hr_features = attention.tokens if whole else self._stitched(attention.tokens)
        kept = tokens.new_full((images.shape[0],), tokens.shape[1] / self.hr_grid**2, dtype=torch.float32)
        return EncodedImages(project(tokens), None, hr_features=hr_features, kept_fraction=kept)

    def encode(self, images: Tensor, project: Callable[[Tensor], Tensor], mode: str,
               content_box: Tensor | None = None) -> EncodedImages:
        """``content_box`` (B, 4): the part of each padded square that shows the image (the whole square
        when None)."""
        lr_features = self.encode_low_res(images) if mode != "hd" else None
        hr_features = self.encode_high_res(images) if mode != "lr_only" else None
        out = EncodedImages(project(hr_features if mode == "hd" else lr_features), None,
                            lr_features=lr_features, hr_features=hr_features)
        if mode in ("xattn", "flex"):
            if content_box is None:
                content_box = images.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(images.shape[0], 4)
            out.high_res = project(hr_features)
            out.layout = square_layout(valid_grid(content_box, self.lr_grid, self.margin_rule),
                                       valid_grid(content_box, self.hr_grid))
        return out

    def encode_low_res(self, images: Tensor) -> Tensor:
        self._check_size(images)
        size = self.backbone.image_size
        # antialiased resizing has no bf16 / fp16 CPU kernel; in float32 it costs nothing next to the tower
        small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.backbone(small.to(images.dtype))

    def encode_high_res(self, images: Tensor) -> Tensor:
        self._check_size(images)
        with contextlib.nullcontext() if self.high_res_grad else torch.no_grad():
            if self.high_res_path == "whole":
                return self.backbone(images)
            return self._encode_crops(images)

    def _encode_crops(self, images: Tensor) -> Tensor:
        return self._stitched(self.backbone(self._crops(images)))

    def _crops(self, images: Tensor) -> Tensor:
        """(B, 3, z*n, z*n) -> (B*z*z, 3, n, n), each image's crops row-major."""
        batch, channels = images.shape[:2]
        z, n = self.zoom, self.backbone.image_size
        crops = images.reshape(batch, channels, z, n, z, n).permute(0, 2, 4, 1, 3, 5)
        return crops.reshape(batch * z * z, channels, n, n)

    def _stitched(self, tokens: Tensor) -> Tensor:
        """The crops' tokens (B*z*z, g*g, C) -> (B, z*g * z*g, C): big-grid row = crop row * g + token row,
        same for columns."""
        z, g = self.zoom, self.lr_grid
        tokens = tokens.reshape(-1, z, z, g, g, tokens.shape[-1]).permute(0, 1, 3, 2, 4, 5)
        return tokens.reshape(tokens.shape[0], (z * g) ** 2, -1)

    def _check_size(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[-2:] != (self.high_res_size, self.high_res_size):
            size = self.high_res_size
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
