"""The Idefics3 / SmolVLM connector: transformers' ``Idefics3Connector`` / ``SmolVLMConnector`` is a pixel shuffle
(space to depth) by ``scale_factor`` and one linear map to the decoder's width. flexvlm splits it: the shuffle
(``pixel_shuffle``) is the encoder's, the linear map ``modality_projection.proj`` (no bias, named as under
transformers' ``model.connector.``) is FlexVLM's projector."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Connector", "pixel_shuffle"]


def pixel_shuffle(x: Tensor, scale_factor: int) -> Tensor:
    """(V, n * n, C) patch tokens of square views, row-major -> (V, (n / s)^2, C * s^2), the operations of
    transformers' ``Idefics3Connector.pixel_shuffle`` (SmolVLM's is the same code) step by step: output token
    (i, j), row-major over the (n / s) x (n / s) grid, holds the s x s patches (i s + a, j s + b), patch (a, b)'s
    features at channels (a s + b) C to (a s + b + 1) C."""
    views, seq, dim = x.shape
    side = int(seq**0.5)
    if side * side != seq or side % scale_factor:
        raise ValueError(f"pixel shuffle by {scale_factor} needs a square grid of patches whose side it divides, "
                         f"got {seq} patches")
    s = scale_factor
    x = x.reshape(views, side, side, dim)
    x = x.reshape(views, side, side // s, dim * s)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(views, side // s, side // s, dim * s * s)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(views, seq // (s * s), dim * s * s)


class _ModalityProjection(nn.Module):
    """transformers' ``Idefics3SimpleMLP``: one linear map, no bias (the name ``proj`` is the checkpoint's)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Connector(nn.Module):
    """Pixel-shuffled view tokens (V, t * t, vision_hidden * s^2) -> (V, t * t, text_hidden). The shuffle itself
    is the encoder's (``TiledEncoder``): it is the views' geometry, and an objective on the features reads it."""

    def __init__(self, in_features: int, text_hidden: int) -> None:
        super().__init__()
        self.modality_projection = _ModalityProjection(in_features, text_hidden)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.modality_projection(tokens)
