"""Dual-path encoding against naive loops over crops and hand-built images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import resize

from flexvlm.models.encoder import DualPathEncoder
from flexvlm.models.vision import PatchMLPBackbone, VisionBackbone


class PatchMean(VisionBackbone):
    """Token = mean of each channel over its patch: no weights, no positions, easy to reason about."""

    def __init__(self, image_size: int = 8, patch_size: int = 4) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.embed_dim = image_size, patch_size, 3
        self.mean = self.std = (0.0, 0.0, 0.0)

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.patch_size).flatten(2).transpose(1, 2)


def _patch_id_image(grid: int, patch: int) -> torch.Tensor:
    """(1, 3, grid*patch, grid*patch): every pixel holds the row-major index of its patch."""
    ids = torch.arange(grid * grid, dtype=torch.float32).reshape(grid, grid)
    return ids.repeat_interleave(patch, 0).repeat_interleave(patch, 1).expand(1, 3, -1, -1)


def test_sizes():
    encoder = DualPathEncoder(PatchMLPBackbone(image_size=32, patch_size=8), zoom=3)
    assert (encoder.lr_grid, encoder.hr_grid, encoder.high_res_size) == (4, 12, 96)
    whole = DualPathEncoder(PatchMLPBackbone(image_size=32, patch_size=8), zoom=3, high_res_path="whole")
    assert (whole.lr_grid, whole.hr_grid, whole.high_res_size) == (4, 12, 96)


@pytest.mark.parametrize("path", ["crops", "whole"])
def test_high_res_token_k_is_patch_k_of_the_big_image(path):
    encoder = DualPathEncoder(PatchMean(image_size=8, patch_size=4), zoom=3, high_res_path=path)  # g = 2, 6 x 6
    tokens = encoder.encode_high_res(_patch_id_image(6, 4))
    assert tokens.shape == (1, 36, 3)
    torch.testing.assert_close(tokens[0, :, 0], torch.arange(36.0))
    # by hand: big-grid (row 2, column 3) is crop (1, 1), its token (0, 1)
    assert tokens[0, 2 * 6 + 3, 0] == 2 * 6 + 3


def test_crops_match_a_naive_loop():
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=16, patch_size=4, embed_dim=8, hidden_dim=16).eval()
    encoder = DualPathEncoder(backbone, zoom=3)
    images = torch.randn(2, 3, 48, 48)
    grid = encoder.encode_high_res(images).reshape(2, 12, 12, 8)
    for i in range(3):
        for j in range(3):
            crop = images[:, :, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            expected = backbone(crop).reshape(2, 4, 4, 8)
            torch.testing.assert_close(grid[:, 4 * i : 4 * (i + 1), 4 * j : 4 * (j + 1)], expected)


@pytest.mark.parametrize("zoom", [1, 2, 3])
def test_whole_path_is_one_pass_at_any_zoom(zoom):
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=16, patch_size=4, embed_dim=8, hidden_dim=16).eval()
    encoder = DualPathEncoder(backbone, zoom=zoom, high_res_path="whole")
    images = torch.randn(2, 3, 16 * zoom, 16 * zoom)
    tokens = encoder.encode_high_res(images)
    assert tokens.shape == (2, (4 * zoom) ** 2, 8)
    torch.testing.assert_close(tokens, backbone(images))


def test_low_res_is_backbone_of_the_antialiased_resize():
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=16, patch_size=4, embed_dim=8, hidden_dim=16).eval()
    encoder = DualPathEncoder(backbone, zoom=3)
    images = torch.randn(2, 3, 48, 48)
    expected = backbone(resize(images, [16, 16], antialias=True))  # torchvision: bilinear by default
    torch.testing.assert_close(encoder.encode_low_res(images), expected)
    lr, hr = encoder.grid_features(images)
    assert lr.shape == (2, 16, 8) and hr.shape == (2, 144, 8)


@pytest.mark.parametrize("path", ["crops", "whole"])
def test_high_res_gradient_switch(path):
    images = torch.randn(1, 3, 32, 32)
    frozen_path = DualPathEncoder(PatchMLPBackbone(image_size=16, patch_size=4), zoom=2, high_res_path=path)
    assert not frozen_path.encode_high_res(images).requires_grad
    assert frozen_path.encode_low_res(images).requires_grad  # the low-res path always trains

    trained_path = DualPathEncoder(
        PatchMLPBackbone(image_size=16, patch_size=4), zoom=2, high_res_path=path, high_res_grad=True
    )
    trained_path.encode_high_res(images).sum().backward()
    assert all(p.grad is not None for p in trained_path.backbone.parameters())
    with torch.no_grad():  # an outer no_grad still wins
        assert not trained_path.encode_high_res(images).requires_grad


def test_errors():
    with pytest.raises(ValueError, match="crops, whole"):
        DualPathEncoder(PatchMean(), high_res_path="tiles")
    encoder = DualPathEncoder(PatchMean(image_size=8, patch_size=4), zoom=3)
    with pytest.raises(ValueError, match=r"\(B, 3, 24, 24\)"):
        encoder.encode_high_res(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, 24, 24\)"):
        encoder.encode_low_res(torch.zeros(1, 3, 24, 16))
