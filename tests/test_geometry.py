"""The visual-geometry descriptor (flexvlm.models.geometry) and selection on grids that are not one
square image: hand-computed cases and naive loops over the canvas."""

import pytest
import torch
import torch.nn.functional as F

from flexvlm.models.geometry import VisualLayout, high_res_rope, interpolate_rope, square_layout, uniform_cells
from flexvlm.selection import AttentionSelection, CenterSelection, RandomSelection, SelectionContext, valid_grid


def test_uniform_cells_by_hand():
    sizes = torch.tensor([[4, 6], [2, 3], [0, 0]])
    cells = uniform_cells(sizes, (4, 6), (2, 2))
    assert cells[0].tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2
    # a 2 x 3 grid in the corner of the canvas: row r -> cell row floor(2 r / 2), column c -> floor(2 c / 3)
    assert cells[1].tolist() == [[0, 0, 1, -1, -1, -1], [2, 2, 3, -1, -1, -1]] + [[-1] * 6] * 2
    assert (cells[2] == -1).all()  # no high-res tokens at all


def test_square_layout_is_llava_geometry():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]])
    layout = square_layout(valid_grid(box, 4), valid_grid(box, 12))
    assert layout.lr_shape == (4, 4) and layout.hr_shape == (12, 12)
    # the high-res token (r, c) lies under low-res cell (r // 3, c // 3)
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.equal(layout.hr_cell[1], rows // 3 * 4 + cols // 3)
    assert layout.hr_sizes.tolist() == [[12, 12], [12, 12]]


def test_high_res_rope_interpolates_each_sample_on_its_own_grid():
    torch.manual_seed(0)
    cos, sin = torch.randn(3, 6, 8), torch.randn(3, 6, 8)  # low-res grid 2 x 3
    sizes = torch.tensor([[4, 6], [2, 9], [0, 0]])
    layout = VisualLayout((2, 3), sizes, uniform_cells(sizes, (4, 9), (2, 3)), torch.ones(3, 2, 3, dtype=torch.bool),
                          uniform_cells(sizes, (4, 9), (2, 3)) >= 0)
    hr_cos, hr_sin = high_res_rope(cos, sin, layout)
    assert hr_cos.shape == (3, 36, 8)
    for b, (h, w) in enumerate(sizes.tolist()):
        canvas = hr_cos[b].view(4, 9, 8)
        if h:  # bicubic from the (2, 3) grid onto the sample's own (h, w), as F.interpolate resamples an image
            ref = F.interpolate(cos[b].T.reshape(1, 8, 2, 3), size=(h, w), mode="bicubic", align_corners=False)
            assert torch.allclose(canvas[:h, :w], ref[0].permute(1, 2, 0), atol=1e-6)
        assert (canvas[h:] == 0).all() and (canvas[:, w:] == 0).all()
    # one grid for the whole batch: the release's interpolation as it was
    one = torch.tensor([[4, 6]] * 3)
    same = VisualLayout((2, 3), one, uniform_cells(one, (4, 6), (2, 3)), layout.lr_valid,
                        torch.ones(3, 4, 6, dtype=torch.bool))
    assert torch.equal(high_res_rope(cos, sin, same)[1], interpolate_rope(cos, sin, (2, 3), (4, 6))[1])


def _irregular_layout():
    """Two samples on a 3 x 5 canvas over a 2 x 3 low-res grid, with a cell map that is not even (as
    LLaVA-OneVision's unpadded grid), the second sample's grid 2 x 4."""
    torch.manual_seed(1)
    sizes = torch.tensor([[3, 5], [2, 4]])
    cells = torch.randint(0, 6, (2, 3, 5))
    off = uniform_cells(sizes, (3, 5), (1, 1)) < 0
    cells = cells.masked_fill(off, -1)
    lr_valid = torch.ones(2, 2, 3, dtype=torch.bool)
    return VisualLayout((2, 3), sizes, cells, lr_valid, ~off)


def test_attention_budget_on_an_irregular_layout_matches_naive_loops():
    layout = _irregular_layout()
    ctx = SelectionContext(layout, layer=1)
    attn = torch.rand(2, 4, 2, 3)
    got = AttentionSelection(ratio=0.34)(attn, ctx)
    assert got.shape == (2, 4, 3, 5)
    for b in range(2):
        held = set(layout.hr_cell[b][layout.hr_valid[b]].tolist())  # cells with a high-res token
        keep = max(1, round(len(held) * 0.34))
        for r in range(4):
            ranked = sorted(held, key=lambda c: -attn[b, r].flatten()[c].item())[:keep]
            for i in range(3):
                for j in range(5):
                    expected = bool(layout.hr_valid[b, i, j]) and layout.hr_cell[b, i, j].item() in ranked
                    assert bool(got[b, r, i, j]) == expected


def test_threshold_rule_on_a_non_square_grid_matches_naive_loops():
    sizes = torch.tensor([[4, 6]])
    cells = uniform_cells(sizes, (4, 6), (2, 3))
    layout = VisualLayout((2, 3), sizes, cells, torch.tensor([[[True, True, False], [True, True, True]]]), cells >= 0)
    attn = torch.tensor([[[[0.1, 0.9, 5.0], [0.2, 0.3, 0.15]]]])
    got = AttentionSelection(threshold=48)(attn, SelectionContext(layout, layer=1))
    scores = attn[0, 0] * layout.lr_valid[0]  # the border cell (0, 2) is zeroed first
    normed = (scores - scores.min()) / (scores.max() - scores.min())
    kept = (normed * 255 > 48).flatten()
    assert torch.equal(got[0, 0], kept[cells[0]])
    assert got[0, 0].sum() == 4 * kept.sum()  # each cell is 2 x 2 high-res tokens


def test_block_grids_lie_evenly_on_each_samples_grid():
    layout = _irregular_layout()
    got = RandomSelection(top_k=1, block_grid=2, seed=0)(torch.rand(2, 3, 2, 3), SelectionContext(layout, layer=1))
    for b, (h, w) in enumerate(layout.hr_sizes.tolist()):
        blocks = uniform_cells(layout.hr_sizes[b: b + 1], (3, 5), (2, 2))[0]
        for r in range(3):
            chosen = set(blocks[got[b, r]].tolist())
            assert len(chosen) == 1  # one block, all of its tokens on the sample's grid
            assert got[b, r].sum() == (blocks == chosen.pop()).sum()


def test_center_on_a_wide_grid():
    sizes = torch.tensor([[2, 10]])
    cells = uniform_cells(sizes, (2, 10), (1, 5))
    layout = VisualLayout((1, 5), sizes, cells, torch.ones(1, 1, 5, dtype=torch.bool), cells >= 0)
    got = CenterSelection(top_k=1)(torch.rand(1, 1, 1, 5), SelectionContext(layout, layer=1))
    assert got[0, 0].nonzero()[:, 1].unique().tolist() == [4, 5]  # the middle cell's two columns


def test_square_only_properties_say_what_to_read_instead():
    ctx = SelectionContext(_irregular_layout(), layer=1)
    assert ctx.lr_shape == (2, 3) and ctx.hr_shape == (3, 5)
    with pytest.raises(ValueError, match="not square: read ctx.lr_shape"):
        ctx.lr_grid
