"""Selection strategies: registered by name, or any importable class via ``class_path``."""

from __future__ import annotations

from flexvlm.selection.attention import AttentionSelection
from flexvlm.selection.base import (
    SELECTION, BlockSelection, Budget, SelectionContext, SelectionStrategy, valid_grid,
)
from flexvlm.selection.baselines import AllSelection, CenterSelection, NoSelection, RandomSelection
from flexvlm.selection.mass import MassSelection
from flexvlm.selection.soft import SoftSelection


def build_selection(spec: str | SelectionStrategy) -> SelectionStrategy:
    """A strategy instance from its registered name (plugins included) or as given."""
    if isinstance(spec, SelectionStrategy):
        return spec
    return SELECTION.get(spec)()


__all__ = [
    "SELECTION", "AllSelection", "AttentionSelection", "BlockSelection", "Budget", "CenterSelection",
    "MassSelection", "NoSelection", "RandomSelection", "SelectionContext", "SelectionStrategy", "SoftSelection",
    "build_selection", "valid_grid",
]
