"""PyramidDrop (Xing et al., CVPR 2025): the decoder is cut into stages; at each stage's start the
image tokens are rated by the first layer of the stage (its attention from the last instruction
token) and the share lambda of those left is kept, so that stage s holds lambda^s of them. Used in
training as well as at inference; the sequence is renumbered after each drop, as in its code."""

from __future__ import annotations

from flexvlm.reduction.base import REDUCTION, Stage, TokenReduction


@REDUCTION.register("pyramid_drop")
class PyramidDrop(TokenReduction):
    renumber_positions = True

    def __init__(self, layers: list[int] | None = None, ratio: float = 0.5) -> None:
        """``layers``: the layers that start a stage (the paper's 8, 16, 24 of LLaMA-7B's 32; default
        those quarters of any decoder); ``ratio``: lambda, the share of image tokens each stage keeps."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"PyramidDrop's lambda is a share, in [0, 1], got {ratio}")
        if layers is not None and list(layers) != sorted(set(layers)):
            raise ValueError(f"PyramidDrop's stage layers must be distinct and increasing, got {layers}")
        self.layers, self.ratio = None if layers is None else list(layers), ratio

    def stage_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return self.layers
        quarters = sorted({round(num_layers * q / 4) for q in (1, 2, 3)} - {0, num_layers})
        if not quarters:
            raise ValueError(f"a {num_layers}-layer decoder has no room for PyramidDrop's stages: give layers")
        return quarters

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(prune_before=layer, rate_at=layer, keep=self.ratio ** (s + 1))
                for s, layer in enumerate(self.stage_layers(num_layers))]

    def describe(self) -> str:
        return f"PyramidDrop(layers={self.layers or 'quarters'}, lambda={self.ratio})"
