"""Token reductions of the in-sequence image tokens (the field's peers of FlexAttention): registered by
name, or any importable class via ``class_path``."""

from __future__ import annotations

from flexvlm.reduction.base import REDUCTION, ImageTokenReduction, Stage, TokenReduction, kept_count
from flexvlm.reduction.fastv import FastV
from flexvlm.reduction.pyramid_drop import PyramidDrop
from flexvlm.reduction.sparsevlm import SparseVLM
from flexvlm.reduction.visionzip import VisionZip


def build_reduction(spec: str | TokenReduction | ImageTokenReduction) -> TokenReduction | ImageTokenReduction:
    """A reduction instance from its registered name (plugins included) or as given."""
    if isinstance(spec, (TokenReduction, ImageTokenReduction)):
        return spec
    return REDUCTION.get(spec)()


__all__ = ["REDUCTION", "FastV", "ImageTokenReduction", "PyramidDrop", "SparseVLM", "Stage", "TokenReduction",
           "VisionZip", "build_reduction", "kept_count"]
