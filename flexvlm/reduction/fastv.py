"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): after layer K, keep the image tokens that the
last token attends to most (mean over heads of layer K-1's attention), dropping the share R."""

from __future__ import annotations

from flexvlm.reduction.base import REDUCTION, Stage, TokenReduction


@REDUCTION.register("fastv")
class FastV(TokenReduction):
    def __init__(self, k: int = 2, r: float | None = None, keep: float | None = None) -> None:
        """``k``: the layer before which the image tokens are dropped (the paper's K; 2 in its main
        setting); ``r``: the share of image tokens dropped (the paper's R: 0.5, its default, or 0.75),
        or instead ``keep``, the share kept (1 - R: the budget a protocol gives every method)."""
        if k < 1:
            raise ValueError(f"FastV's K must be >= 1 (the layer whose map rates the tokens is K - 1), got {k}")
        if r is not None and keep is not None:
            raise ValueError(f"FastV takes R or keep (= 1 - R), not both (got r={r}, keep={keep})")
        r = 1.0 - keep if keep is not None else 0.5 if r is None else r
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"FastV's R is a share of the image tokens, in [0, 1], got {r}")
        self.k, self.r = k, r

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(prune_before=self.k, rate_at=self.k - 1, keep=1.0 - self.r)]

    def describe(self) -> str:
        return f"FastV(K={self.k}, R={self.r})"
