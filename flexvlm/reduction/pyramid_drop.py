"""PyramidDrop (Xing et al., CVPR 2025): the decoder is cut into stages; at each stage's start the
image tokens are rated by the first layer of the stage (its attention from the last instruction
token) and the share lambda of those left is kept, so that stage s holds lambda^s of them. Used in
training as well as at inference; the sequence is renumbered after each drop, as in its code."""

from __future__ import annotations

from flexvlm.reduction.base import REDUCTION, Stage, TokenReduction, stage_ratio


@REDUCTION.register("pyramid_drop")
class PyramidDrop(TokenReduction):
    renumber_positions = True

    def __init__(self, layers: list[int] | None = None, ratio: float | None = None, keep: float | None = None) -> None:
        """``layers``: the layers that start a stage (the paper's 8, 16, 24 of LLaMA-7B's 32; default
        those quarters of any decoder); ``ratio``: lambda, the share of image tokens each stage keeps
        (0.5, the paper's, by default), or instead ``keep``: the mean share of the image tokens that the
        layers from the first stage on see (the budget a protocol gives every method), which sets lambda."""
        if ratio is not None and keep is not None:
            raise ValueError(f"PyramidDrop takes lambda (ratio) or keep, not both (got ratio={ratio}, keep={keep})")
        for name, share in (("lambda", ratio), ("keep", keep)):
            if share is not None and not 0.0 <= share <= 1.0:
                raise ValueError(f"PyramidDrop's {name} is a share, in [0, 1], got {share}")
        if layers is not None and list(layers) != sorted(set(layers)):
            raise ValueError(f"PyramidDrop's stage layers must be distinct and increasing, got {layers}")
        self.layers = None if layers is None else list(layers)
        self.ratio, self.keep = (0.5 if ratio is None and keep is None else ratio), keep

    def stage_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return self.layers
        quarters = sorted({round(num_layers * q / 4) for q in (1, 2, 3)} - {0, num_layers})
        if not quarters:
            raise ValueError(f"a {num_layers}-layer decoder has no room for PyramidDrop's stages: give layers")
        return quarters

    def stages(self, num_layers: int) -> list[Stage]:
        layers = self.stage_layers(num_layers)
        ratio = self.ratio if self.ratio is not None else stage_ratio(self.keep, layers, num_layers)
        return [Stage(prune_before=layer, rate_at=layer, keep=ratio ** (s + 1)) for s, layer in enumerate(layers)]

    def describe(self) -> str:
        setting = f"lambda={self.ratio}" if self.ratio is not None else f"keep={self.keep}"
        return f"PyramidDrop(layers={self.layers or 'quarters'}, {setting})"
