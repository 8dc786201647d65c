"""Projectors from vision features to the language model's width, laid out like LLaVA's `mm_projector`."""

from __future__ import annotations

import re

from torch import nn

__all__ = ["build_projector"]

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    """"linear": nn.Linear; "mlp{N}x_gelu" (LLaVA-1.5: mlp2x_gelu): N Linear layers with GELU between;
    ``bias``: the Linears' (LLaVA-OneVision's ``multimodal_projector_bias`` may switch them off).

    The layouts match LLaVA's, so its `mm_projector.*` weights load by plain prefix stripping
    (`weight, bias` for linear; `0.*, 2.*` for mlp2x_gelu).
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    match = _MLP_GELU.match(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector kind {kind!r}; valid: linear, mlp<N>x_gelu with N >= 1 (e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=bias)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias)]
    return nn.Sequential(*layers)
