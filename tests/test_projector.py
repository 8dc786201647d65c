"""Projectors: LLaVA-1.5 layouts and hand-computed outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexvlm.models.projector import build_projector


def test_linear_is_llava_linear():
    projector = build_projector("linear", 8, 16)
    assert isinstance(projector, nn.Linear)
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == {"weight": (16, 8), "bias": (16,)}


def test_mlp2x_gelu_layout_and_output():
    torch.manual_seed(0)
    projector = build_projector("mlp2x_gelu", 8, 16)
    state = projector.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.weight": (16, 8),
        "0.bias": (16,),
        "2.weight": (16, 16),
        "2.bias": (16,),
    }
    x = torch.randn(2, 5, 8)
    hidden = F.gelu(x @ state["0.weight"].T + state["0.bias"])  # exact (erf) GELU, as in LLaVA
    torch.testing.assert_close(projector(x), hidden @ state["2.weight"].T + state["2.bias"])


def test_llava_mm_projector_weights_load_after_prefix_stripping():
    llava = {f"model.mm_projector.{k}": v for k, v in build_projector("mlp2x_gelu", 8, 16).state_dict().items()}
    projector = build_projector("mlp2x_gelu", 8, 16)
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in llava.items()})


def test_deeper_mlp_follows_llava_naming():
    keys = list(build_projector("mlp3x_gelu", 4, 6).state_dict())
    assert keys == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


@pytest.mark.parametrize("kind", ["mlp", "mlp0x_gelu", "identity", "mlp2x_relu"])
def test_unknown_kind(kind):
    with pytest.raises(ValueError, match="linear.*mlp2x_gelu"):
        build_projector(kind, 4, 4)
