"""The synthetic task: determinism, layout rules, targets decoded back from the pixels,
answer balance, what the low-res view keeps, and the auxiliary losses."""

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.synthetic import (
    COLOUR_NAMES,
    COLOURS,
    DIGITS,
    GLYPHS,
    WORDS,
    SyntheticVQA,
    draw_scene,
    layout_tiles,
    paint_glyph,
    render_sample,
)
from flexvlm.losses import SyntheticAuxLoss, grounding_loss

HR_GRID, LR_GRID, ZOOM, PATCH = 12, 4, 3, 8


def decode_patch(patch: np.ndarray) -> tuple[int, int]:
    """Read an 8 x 8 HR patch from its pixels alone: (colour class, digit or IGNORE_INDEX)."""
    paper = np.median(patch.reshape(-1, 3), axis=0)
    if paper.max() - paper.min() < 60:
        return 0, IGNORE_INDEX  # grey background or clutter
    colour = min(COLOUR_NAMES, key=lambda c: np.linalg.norm(paper - np.array(COLOURS[c])))
    # black ink, or fine print: 48 per channel away from the colour, either way
    ink = np.abs(patch - paper).sum(axis=2) > 72
    glyph = ["".join("#" if v else "." for v in row) for row in ink[0:7, 1:6]]  # glyph box
    assert ink.sum() == sum(row.count("#") for row in glyph), "ink outside the glyph box"
    digit = [d for d, rows in GLYPHS.items() if list(rows) == glyph]
    assert len(digit) == 1, f"unreadable glyph {glyph}"
    return COLOUR_NAMES.index(colour) + 1, digit[0]


def test_glyphs_are_distinct_5x7_bitmaps():
    assert sorted(GLYPHS) == list(range(10))
    assert all(len(rows) == 7 and all(len(r) == 5 for r in rows) for rows in GLYPHS.values())
    assert len({rows for rows in GLYPHS.values()}) == 10


def test_samples_are_deterministic_and_splits_differ():
    a, b = SyntheticVQA(8, seed=1)[5], SyntheticVQA(8, seed=1)[5]
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]
    images = {
        (seed, split): render_sample(seed, 5, split=split).image.tobytes()
        for seed in (1, 2)
        for split in ("train", "val", "test")
    }
    assert len(set(images.values())) == 6
    ids = {SyntheticVQA(8, seed=1, split=s)[5]["question_id"] for s in ("train", "val", "test")}
    assert len(ids) == 3
    with pytest.raises(IndexError):
        SyntheticVQA(8, seed=1)[8]


def test_item_fields_and_normalisation():
    dataset = SyntheticVQA(4, seed=0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    item = dataset[2]
    scene = dataset.scene(2)
    pixels = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.5])
    expected = (pixels - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(item["image"], expected)
    assert item["content_box"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert item["question"] == scene.query.colour and item["question"] in WORDS
    assert item["answer"] == str(scene.query.digit) and item["answers"] == [item["answer"]]
    assert item["aux_lr_colour"].shape == (16,) and item["aux_hr_colour"].shape == (144,)
    assert item["aux_hr_digit"].dtype == torch.long and item["aux_hr_digit"].shape == (144,)


@pytest.mark.parametrize("fine_print", [False, True])
def test_layout_rules_and_targets_decoded_from_pixels(fine_print):
    dataset = SyntheticVQA(150, seed=3, fine_print=fine_print)
    offsets = set()
    for index in range(len(dataset)):
        item, scene = dataset[index], dataset.scene(index)
        pixels = np.array(scene.image).astype(int)
        decoded = [
            decode_patch(pixels[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH])
            for r in range(HR_GRID)
            for c in range(HR_GRID)
        ]
        hr_colour = torch.tensor([d[0] for d in decoded])
        assert torch.equal(item["aux_hr_colour"], hr_colour)
        assert torch.equal(item["aux_hr_digit"], torch.tensor([d[1] for d in decoded]))
        # 2-4 tiles of distinct colours, at most one per LR cell
        colours = hr_colour[hr_colour > 0].tolist()
        assert 2 <= len(colours) <= 4 and len(set(colours)) == len(colours)
        cells = hr_colour.view(LR_GRID, ZOOM, LR_GRID, ZOOM).permute(0, 2, 1, 3).reshape(LR_GRID**2, -1)
        assert ((cells > 0).sum(1) <= 1).all()
        assert torch.equal(item["aux_lr_colour"], cells.max(1).values)
        # the question's colour names exactly one tile, whose digit is the answer
        (asked,) = (hr_colour == COLOUR_NAMES.index(item["question"]) + 1).nonzero()[:, 0].tolist()
        assert str(decoded[asked][1]) == item["answer"]
        offsets |= {(t.row % ZOOM, t.col % ZOOM) for t in scene.tiles}
    assert len(offsets) == ZOOM * ZOOM  # tiles sit anywhere in their cell, not only centred


def test_answers_and_colours_are_balanced():
    dataset = SyntheticVQA(2000, seed=0)
    scenes = [dataset.scene(i) for i in range(len(dataset))]
    answers = Counter(s.answer for s in scenes)
    assert set(answers) == set(DIGITS)
    assert all(150 <= n <= 250 for n in answers.values()), answers  # expected 200, sd ~13
    questions = Counter(s.question for s in scenes)
    assert all(420 <= n <= 580 for n in questions.values()), questions  # expected 500
    assert Counter(len(s.tiles) for s in scenes).keys() == {2, 3, 4}


def test_fine_print_averages_to_the_tile_colour():
    colour = np.array([200.0, 55.0, 130.0])
    for digit in range(10):
        for polarity in (-1.0, 1.0):
            patch = np.tile(colour, (PATCH, PATCH, 1))
            paint_glyph(patch, digit, colour, polarity)
            ink = np.abs(patch - colour).sum(axis=2) > 0
            glyph = ["".join("#" if v else "." for v in row) for row in ink[0:7, 1:6]]
            assert glyph == list(GLYPHS[digit]) and ink.sum() == sum(r.count("#") for r in glyph)
            # each ink pixel sits 48 above or below the colour, alternating
            offsets = (patch[ink] - colour) / 48
            assert np.allclose(np.abs(offsets), 1)
            assert np.allclose(offsets[0], polarity) and np.allclose(offsets[1:] + offsets[:-1], 0)
            # so the patch mean moves by at most one pixel's offset / 64
            assert np.abs(patch.mean(axis=(0, 1)) - colour).max() <= 48 / 64 + 1e-9
    with pytest.raises(ValueError, match="fine print needs a colour"):
        paint_glyph(np.zeros((PATCH, PATCH, 3)), 0, np.array([20.0, 100.0, 100.0]), 1.0)


def _pixels(images: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(v)).permute(2, 0, 1).float() / 255 for v in images])


def _low_res(hr: torch.Tensor) -> torch.Tensor:
    """The model's low-res view (DualPathEncoder.encode_low_res's resize) of (N, 3, H, W) pixels."""
    size = (hr.shape[-2] // ZOOM, hr.shape[-1] // ZOOM)
    return F.interpolate(hr, size=size, mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("fine_print,max_mean", [(False, 1 / 255), (True, 0.1 / 255)])
def test_low_res_view_keeps_the_colour_blob_not_the_glyph(fine_print, max_mean):
    """Two images that differ only in the digit: at HR the glyphs differ at full contrast; in the
    model's low-res view only a few pixels under the tile move (whether what moves is readable:
    the probe test)."""
    tiles = layout_tiles(np.random.default_rng(1), 96, PATCH, ZOOM, (4, 4))
    variants = [
        draw_scene([replace(tiles[0], digit=d), *tiles[1:]], 96, PATCH, np.random.default_rng(2), fine_print)
        for d in range(10)
    ]
    hr = _pixels(variants)
    lr = _low_res(hr)
    for a in range(10):
        for b in range(a + 1, 10):
            assert ((hr[a] - hr[b]).abs().amax(0) > 0.15).sum() >= 2  # HR: legible, distinct glyphs
            lr_diff = (lr[a] - lr[b]).abs()
            assert lr_diff.mean() < max_mean and (lr_diff.amax(0) > 1 / 255).sum() <= 12
    # the colour blob survives: the LR pixel at the tile's centre keeps the tile's hue
    centre = lr[0][:, (tiles[0].row * PATCH + 4) // ZOOM, (tiles[0].col * PATCH + 4) // ZOOM]
    colour = torch.tensor(COLOURS[tiles[0].colour]) / 255
    assert F.cosine_similarity(centre - centre.mean(), colour - colour.mean(), dim=0) > 0.9


def _probe_accuracy(pixels: torch.Tensor, digits: torch.Tensor, train: int) -> float:
    """Ridge regression to one-hot digits from (N, 3, h, w) pixels and their distance to the
    patch's median colour (which ignores the glyph's polarity), fitted on the first ``train``
    rows, scored on the rest."""
    deviation = (pixels - pixels.flatten(2).median(-1).values[..., None, None]).abs()
    x = torch.cat([pixels.flatten(1), deviation.flatten(1), torch.ones(len(pixels), 1)], 1).double()
    y = F.one_hot(digits, 10).double()
    a, b = x[:train], y[:train]
    weights = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype), a.T @ b)
    return float((x[train:] @ weights).argmax(1).eq(digits[train:]).double().mean())


@pytest.mark.parametrize("fine_print", [False, True])
def test_a_linear_probe_reads_the_digit_at_high_res_and_low_res_only_without_fine_print(fine_print):
    """Given where the queried tile is, a linear probe reads its digit from the HR tile's pixels.
    From the pixels of its low-res cell it reads most solid black digits (the default task leaks),
    but not fine print (chance: 0.1)."""
    scenes = [render_sample(7, i, fine_print=fine_print) for i in range(1500)]
    hr = _pixels([s.image for s in scenes])
    lr_cells, hr_tiles = [], []
    for scene, pixels, small in zip(scenes, hr, _low_res(hr)):
        row, col = scene.query.row, scene.query.col
        hr_tiles.append(pixels[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH])
        lr_cells.append(small[:, row // ZOOM * PATCH : (row // ZOOM + 1) * PATCH,
                              col // ZOOM * PATCH : (col // ZOOM + 1) * PATCH])
    digits = torch.tensor([s.query.digit for s in scenes])
    assert _probe_accuracy(torch.stack(hr_tiles), digits, 1000) > 0.9
    low_res = _probe_accuracy(torch.stack(lr_cells), digits, 1000)
    print(f"fine_print={fine_print}: low-res probe accuracy {low_res:.3f}")  # shown with pytest -s
    assert low_res < 0.2 if fine_print else low_res > 0.25  # measured: 0.09 / 0.32


def _batch(n: int) -> dict[str, torch.Tensor]:
    items = [SyntheticVQA(n, seed=4)[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k.startswith("aux_")}


def test_aux_loss_with_uniform_heads_is_hand_computed():
    loss = SyntheticAuxLoss(embed_dim=8, weight=0.5)
    for head in (loss.lr_colour, loss.hr_colour, loss.hr_digit):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    batch = _batch(3)
    value = loss(torch.randn(3, 16, 8), torch.randn(3, 144, 8), batch)
    # uniform logits: CE = log(classes) per term; 5 colour classes (background + 4), 10 digits
    assert value.item() == pytest.approx(0.5 * (2 * math.log(5) + math.log(10)), rel=1e-6)


def test_aux_loss_reads_targets_in_token_order():
    batch = _batch(4)
    # one-hot tokens that encode their own targets: colour class c -> feature c, digit d -> 6 + d
    lr_tokens = F.one_hot(batch["aux_lr_colour"], 16).float()
    digit_feature = torch.where(batch["aux_hr_digit"] >= 0, batch["aux_hr_digit"] + 6, 5)
    hr_tokens = F.one_hot(batch["aux_hr_colour"], 16).float() + F.one_hot(digit_feature, 16).float()
    loss = SyntheticAuxLoss(embed_dim=16)
    with torch.no_grad():  # oracle heads: logit 20 for the class that the token encodes
        for head, first in ((loss.lr_colour, 0), (loss.hr_colour, 0), (loss.hr_digit, 6)):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:, first : first + head.out_features] = 20 * torch.eye(head.out_features)
    assert loss(lr_tokens, hr_tokens, batch).item() < 1e-6
    shifted = hr_tokens.roll(1, dims=1)
    assert loss(lr_tokens, shifted, batch).item() > 1.0  # misaligned rows cost


def test_grounding_loss_is_hand_computed():
    # two FA layers; the first selecting row's LR attention (2 x 2 grid), then a row it ignores
    first = torch.tensor([[[[0.2, 0.2], [0.4, 0.0]], [[9.0, 9.0], [9.0, 9.0]]]])
    second = torch.tensor([[[[0.1, 0.1], [0.1, 0.1]], [[0.0, 0.0], [0.0, 1.0]]]])
    cell = torch.tensor([2])  # row 1, column 0
    expected = (-math.log(0.4 / 0.8) - math.log(0.25)) / 2
    assert grounding_loss({1: first, 2: second}, cell).item() == pytest.approx(expected, rel=1e-6)
    # it reaches SyntheticAuxLoss only with a weight, and adds to the tower's terms
    batch = {**_batch(1), "aux_query_cell": cell}
    tokens = torch.randn(1, 16, 8), torch.randn(1, 144, 8)
    plain = SyntheticAuxLoss(embed_dim=8)
    grounded = SyntheticAuxLoss(embed_dim=8, grounding_weight=0.5)
    grounded.load_state_dict(plain.state_dict())
    assert plain(*tokens, batch, {1: first, 2: second}).item() == pytest.approx(plain(*tokens, batch).item())
    assert grounded(*tokens, batch, {1: first, 2: second}).item() == pytest.approx(
        plain(*tokens, batch).item() + 0.5 * expected, rel=1e-6)


def test_query_cell_target_is_the_queried_tiles_low_res_cell():
    dataset = SyntheticVQA(50, seed=6)
    for index in range(len(dataset)):
        item = dataset[index]
        cell = item["aux_query_cell"].item()
        assert item["aux_lr_colour"][cell].item() == COLOUR_NAMES.index(item["question"]) + 1
