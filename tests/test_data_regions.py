"""The regions task: determinism, layout and question rules, targets decoded back from the pixels
for both sizes, what the low-res view keeps (a linear probe), the per-answer-token grounding
targets and loss, and the model trained on its batches."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_architecture_data import smolvlm
from test_data_synthetic import _low_res, _pixels, _probe_accuracy

from flexvlm.cli import main
from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.collate import SequenceLimits
from flexvlm.data.datamodule import RegionsVQADataModule, SyntheticVQADataModule
from flexvlm.data.regions import (
    ANSWER_ROWS,
    CLASS_NAMES,
    COLOUR_CLASSES,
    COLOUR_NAMES,
    DIRECTIONS,
    LARGE,
    PAINTS,
    PLAIN,
    WORDS,
    RegionsVQA,
    neighbour,
    render_sample,
)
from flexvlm.data.synthetic import GLYPHS, INK_CONTRAST, paint_glyph
from flexvlm.lit_module import sequence_limits
from flexvlm.losses import SyntheticAuxLoss, grounding_loss
from flexvlm.models.vision import PatchMLPBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AttentionSelection

ROOT = Path(__file__).resolve().parents[1]
PATCH, ZOOM, LR_GRID, HR_GRID = 8, 3, 8, 24
JITTER = 20  # draw_scene's per-channel jitter of a tile's colour


def _clipped(rgb: tuple[int, int, int]) -> np.ndarray:
    """A paint as fine print leaves it: room for the ink above and below."""
    return np.clip(np.array(rgb, dtype=float), INK_CONTRAST, 255 - INK_CONTRAST)


def _ink(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(paper colour, ink mask) of a tile's pixels: fine print sits 48 per channel off the paper."""
    paper = np.median(pixels.reshape(-1, 3), axis=0)
    return paper, np.abs(pixels - paper).sum(axis=2) > 72


def _read_glyph(ink: np.ndarray, scale: int) -> int | None:
    """The digit whose glyph, scaled and centred, is exactly the ink, else None."""
    side = ink.shape[0]
    top, left = (side - 7 * scale) // 2, (side - 5 * scale) // 2
    box = ink[top : top + 7 * scale, left : left + 5 * scale]
    if box.sum() != ink.sum():
        return None  # ink outside the glyph box: background, clutter
    for digit, rows in GLYPHS.items():
        glyph = np.array([[c == "#" for c in row] for row in rows]).repeat(scale, 0).repeat(scale, 1)
        if np.array_equal(box, glyph):
            return digit
    return None


def _colour_class(paper: np.ndarray) -> int:
    if paper.max() - paper.min() < 60:
        return CLASS_NAMES.index(PLAIN) + 1
    return 1 + min(range(len(COLOUR_NAMES)), key=lambda c: np.linalg.norm(paper - _clipped(PAINTS[COLOUR_NAMES[c]])))


def decode_tiles(pixels: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Every tile of a 192 x 192 scene from its pixels alone: (row, col, size, colour class, digit)."""
    found = []
    for row in range(HR_GRID):
        for col in range(HR_GRID):
            for size in (1, LARGE):
                if row % ZOOM + size > ZOOM or col % ZOOM + size > ZOOM:
                    continue  # a tile lies inside one LR cell
                side = size * PATCH
                window = pixels[row * PATCH : row * PATCH + side, col * PATCH : col * PATCH + side]
                paper, ink = _ink(window)
                digit = _read_glyph(ink, size)
                if digit is not None:
                    found.append((row, col, size, _colour_class(paper), digit))
    return found


def test_colours_are_distinct_and_plain_is_colourless():
    paints = {name: _clipped(rgb) for name, rgb in PAINTS.items()}
    for a in COLOUR_NAMES:
        assert np.ptp(paints[a]) - 2 * JITTER >= 60  # saturated whatever the jitter
        for b in CLASS_NAMES:
            if a != b:  # nearer its own centre than any other's, whatever the jitter
                assert np.linalg.norm(paints[a] - paints[b]) > 2 * math.sqrt(3) * JITTER
    assert np.ptp(paints[PLAIN]) + 2 * JITTER < 60
    assert len(WORDS) == len(set(WORDS)) == len(COLOUR_NAMES) + len(DIRECTIONS) + 10


def test_samples_are_deterministic_and_splits_differ():
    a, b = RegionsVQA(8, seed=1)[5], RegionsVQA(8, seed=1)[5]
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]
    images = {(seed, split): render_sample(seed, 5, split=split).image.tobytes()
              for seed in (1, 2) for split in ("train", "val", "test")}
    assert len(set(images.values())) == 6
    assert {RegionsVQA(8, seed=1, split=s)[5]["question_id"] for s in ("train", "val", "test")} == {
        "regions-train-1-5", "regions-val-1-5", "regions-test-1-5"}
    with pytest.raises(IndexError):
        RegionsVQA(8, seed=1)[8]


def test_large_fine_print_cancels_in_every_glyph_pixels_block():
    colour = np.array([150.0, 60.0, 190.0])
    for digit in range(10):
        region = np.tile(colour, (2 * PATCH, 2 * PATCH, 1))
        paint_glyph(region, digit, colour, polarity=1.0, scale=2)
        offsets = (region - colour)[..., 0] / INK_CONTRAST
        assert _read_glyph(offsets != 0, 2) == digit
        blocks = offsets[1:15, 3:13].reshape(7, 2, 5, 2)  # the glyph box, a block per glyph pixel
        assert np.allclose(blocks.sum(axis=(1, 3)), 0)
        assert np.allclose(np.abs(blocks[:, 0, :, 0] - blocks[:, 1, :, 1]), 0)  # a checkerboard


def test_layout_rules_and_targets_decoded_from_pixels():
    dataset = RegionsVQA(30, seed=3)
    sizes, offsets = Counter(), set()
    for index in range(len(dataset)):
        item, scene = dataset[index], dataset.scene(index)
        found = decode_tiles(np.array(scene.image).astype(int))
        assert sorted(found) == sorted((t.row, t.col, t.size, CLASS_NAMES.index(t.colour) + 1, t.digit)
                                       for t in scene.tiles)
        hr_colour = torch.zeros(HR_GRID, HR_GRID, dtype=torch.long)
        hr_digit = torch.full((HR_GRID, HR_GRID), IGNORE_INDEX)
        lr_colour = torch.zeros(LR_GRID, LR_GRID, dtype=torch.long)
        for row, col, size, colour, digit in found:
            hr_colour[row : row + size, col : col + size] = colour
            hr_digit[row : row + size, col : col + size] = digit
            assert lr_colour[row // ZOOM, col // ZOOM] == 0  # at most one tile a cell
            lr_colour[row // ZOOM, col // ZOOM] = colour
        assert torch.equal(item["aux_hr_colour"], hr_colour.flatten())
        assert torch.equal(item["aux_hr_digit"], hr_digit.flatten())
        assert torch.equal(item["aux_lr_colour"], lr_colour.flatten())
        colours = [t.colour for t in scene.tiles if t.colour != PLAIN]
        assert 3 <= len(colours) <= 6 and len(set(colours)) == len(colours)
        sizes.update(t.size for t in scene.tiles)
        offsets |= {(t.size, t.row % ZOOM, t.col % ZOOM) for t in scene.tiles}
    assert sizes[1] > 100 and sizes[LARGE] > 100
    assert len(offsets) == 9 + 4  # anywhere inside their cell: 3 x 3 places for a small tile, 2 x 2 for a large


def test_questions_answers_and_their_balance():
    scenes = [render_sample(0, i) for i in range(600)]
    digits, lengths = Counter(), Counter()
    for scene in scenes:
        by_colour = {t.colour: t for t in scene.tiles if t.colour != PLAIN}
        words = scene.question.split()
        if scene.kind == "read":  # each colour, then its digit, in the order asked
            assert len(set(words)) == len(words) and all(w in by_colour for w in words)
            assert scene.answer == " ".join(f"{w} {by_colour[w].digit}" for w in words)
            lengths[len(words)] += 1
        else:  # the plain tile beside the marker in that direction
            direction, colour = words
            marker = by_colour[colour]
            at = {t.cell(ZOOM): t for t in scene.tiles}
            (target,) = scene.asked
            assert target is at[neighbour(marker.cell(ZOOM), direction, (LR_GRID, LR_GRID))]
            assert target.colour == PLAIN and scene.answer == str(target.digit)
            # neither the direction nor the colour alone tells which plain tile: the marker has another
            # plain tile beside it, another marker one in the same direction
            beside = [at.get(neighbour(marker.cell(ZOOM), d, (LR_GRID, LR_GRID))) for d in DIRECTIONS]
            assert sum(t is not None and t.colour == PLAIN for t in beside) >= 2
            ahead = [at.get(neighbour(m.cell(ZOOM), direction, (LR_GRID, LR_GRID))) for m in by_colour.values()]
            assert sum(t is not None and t.colour == PLAIN for t in ahead) >= 2
        assert scene.target_size == {frozenset({1}): "small", frozenset({LARGE}): "large"}.get(
            frozenset(t.size for t in scene.asked), "mixed")
        digits.update(w for w in scene.answer.split() if w.isdigit())
    kinds = Counter(s.kind for s in scenes)
    assert 250 <= kinds["read"] <= 350, kinds  # expected 300
    assert all(70 <= n <= 135 for n in lengths.values()) and len(lengths) == 3, lengths  # 100 each
    assert set(digits) == {str(d) for d in range(10)}
    assert all(55 <= n <= 125 for n in digits.values()), digits  # expected 90, sd ~9
    assert Counter(s.target_size for s in scenes).keys() == {"small", "large", "mixed"}


def test_a_linear_probe_reads_every_size_at_high_res_and_neither_at_low_res():
    """Given where each tile is, a linear probe reads its digit from its HR pixels; from the pixels
    of its low-res cell it reads chance (0.1), small and large alike."""
    scenes = [render_sample(11, i) for i in range(300)]
    hr = _pixels([s.image for s in scenes])
    crops = {size: ([], [], []) for size in (1, LARGE)}  # HR tiles, LR cells, digits
    for scene, pixels, small in zip(scenes, hr, _low_res(hr)):
        for tile in scene.tiles:
            hr_tiles, lr_cells, digits = crops[tile.size]
            top, left, side = tile.row * PATCH, tile.col * PATCH, tile.size * PATCH
            hr_tiles.append(pixels[:, top : top + side, left : left + side])
            row, col = tile.cell(ZOOM)
            lr_cells.append(small[:, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH])
            digits.append(tile.digit)
    for size, (hr_tiles, lr_cells, digits) in crops.items():
        digits = torch.tensor(digits)
        train = len(digits) * 2 // 3
        high_res = _probe_accuracy(torch.stack(hr_tiles), digits, train)
        low_res = _probe_accuracy(torch.stack(lr_cells), digits, train)
        print(f"size {size}: {len(digits)} tiles, probe accuracy high-res {high_res:.3f}, "
              f"low-res {low_res:.3f} (chance 0.100)")  # shown with pytest -s
        assert high_res > 0.95 and low_res < 0.15  # measured: 1.000 / 0.108 (small), 1.000 / 0.104 (large)


def test_grounding_targets_are_the_cells_each_answer_token_is_read_from():
    dataset = RegionsVQA(30, seed=6)
    for index in range(len(dataset)):
        item, scene = dataset[index], dataset.scene(index)
        cells = item["aux_query_cell"]
        assert cells.shape == (ANSWER_ROWS,) and cells.dtype == torch.long
        answer = item["answer"].split()
        assert (cells[len(answer):] == IGNORE_INDEX).all()  # the end token's row and beyond
        # the row predicting answer token r is grounded on the tile of a digit, on nothing for a colour word
        digit_rows = [r for r, word in enumerate(answer) if word.isdigit()]
        assert (cells[[r for r in range(len(answer)) if r not in digit_rows]] == IGNORE_INDEX).all()
        kinds = [CLASS_NAMES[c - 1] for c in item["aux_lr_colour"][cells[digit_rows]].tolist()]
        assert item["tags"]["regions"] == len(digit_rows)
        if item["tags"]["question_kind"] == "read":
            assert kinds == item["question"].split() == [answer[r - 1] for r in digit_rows]
        else:
            assert kinds == [PLAIN] and digit_rows == [0]
        for cell, tile, row in zip(cells[digit_rows].tolist(), scene.asked, digit_rows, strict=True):
            assert cell == tile.row // ZOOM * LR_GRID + tile.col // ZOOM and str(tile.digit) == answer[row]


def test_grounding_loss_per_answer_row_is_hand_computed():
    # one FA layer, two samples, three selecting rows over a 2 x 2 LR grid
    maps = torch.tensor([
        [[[0.2, 0.2], [0.4, 0.2]], [[0.1, 0.3], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]],
        [[[0.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
    ])
    cells = torch.tensor([[2, 1, IGNORE_INDEX, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    # counted rows: sample 0 rows 0 (0.4 of 1.0) and 1 (0.3 of 0.4), sample 1 row 0 (2.0 of 2.0)
    expected = (-math.log(0.4) - math.log(0.75) - math.log(1.0)) / 3
    assert grounding_loss({1: maps}, cells).item() == pytest.approx(expected, rel=1e-6)
    # a batch of short answers has fewer rows than targets; a (B,) target is its first row's
    assert grounding_loss({1: maps[:, :2]}, cells).item() == pytest.approx(expected, rel=1e-6)
    assert grounding_loss({1: maps}, cells[:, 0]).item() == pytest.approx(
        grounding_loss({1: maps}, torch.tensor([[2, IGNORE_INDEX], [3, IGNORE_INDEX]])).item())


def test_geometry_and_colour_count_errors():
    with pytest.raises(ValueError, match="num_colours must be in"):
        RegionsVQA(4, 0, num_colours=2)
    with pytest.raises(ValueError, match="num_colours must be in"):
        render_sample(0, 0, num_colours=7)
    with pytest.raises(ValueError, match="zoom must be >= 2"):
        RegionsVQA(4, 0, image_size=64, zoom=1)
    with pytest.raises(ValueError, match="cannot hold the task's tiles"):
        RegionsVQA(4, 0, image_size=72)  # a 3 x 3 LR grid
    with pytest.raises(ValueError, match="multiple of patch_size"):
        RegionsVQA(4, 0, image_size=100)


def test_non_square_views_hold_the_task_and_train_smolvlm():
    """SmolVLM's 2 x 3 views: a 4 x 4 LR grid, a cell per 2 x 3 HR tokens, large tiles 2 x 2."""
    for index in range(100):  # the tightest grid the task takes: every draw finds room
        scene = render_sample(0, index, image_size=(64, 96), zoom=(2, 3))
        assert len({t.cell((2, 3)) for t in scene.tiles}) == len(scene.tiles)
    model = smolvlm("flex")
    data = RegionsVQADataModule(num_train=2, num_val=2, num_test=2, batch_size=2, image_size=None, patch_size=None)
    data.setup("fit")
    data.fit_to_model(SequenceLimits(64, 512, 512 - ANSWER_ROWS), model.encoder.image_processor("flex"))
    batch = next(iter(data.train_dataloader()))
    assert batch["aux_hr_colour"].shape == (2, 8 * 12) and batch["aux_lr_colour"].shape == (2, 16)
    out = model(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_the_model_trains_on_its_batches_with_grounding_per_answer_token():
    data = RegionsVQADataModule(num_train=8, num_val=2, num_test=2, batch_size=8)
    torch.manual_seed(0)
    backbone = PatchMLPBackbone(image_size=64, patch_size=8, embed_dim=24, hidden_dim=32)
    model = FlexVLM(backbone, llm="tiny", llm_overrides=dict(hidden_size=32, intermediate_size=64), mode="flex",
                    num_sa_layers=1, selection=AttentionSelection(ratio=0.025), high_res_grad=True)
    data.setup("fit")
    with pytest.raises(ValueError, match="set model.max_new_tokens to 7"):  # 3 colours, 3 digits, the end token
        data.fit_to_model(sequence_limits(model, ANSWER_ROWS - 1))
    data.fit_to_model(sequence_limits(model, ANSWER_ROWS))
    batch = next(iter(data.train_dataloader()))
    assert batch["aux_query_cell"].shape == (8, ANSWER_ROWS)
    assert {t["question_kind"] for t in batch["tags"]} <= {"read", "relational"} and len(batch["tags"]) == 8
    out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["content_box"],
                labels=batch["labels"], map_grad=True)
    rows = max(len(a.split()) for a in batch["answer"]) + 1  # a selecting row per answer token and the end token
    assert all(m.shape == (8, rows, LR_GRID, LR_GRID) for m in out.selection_maps.values())
    # 2.5 % of the 64 cells: 2 cells, 18 of the 576 HR tokens, for every row
    assert all(abs(float(f) - 18 / 576) < 1e-6 for f in out.selected_fraction.values())
    aux = SyntheticAuxLoss(24, grounding_weight=1.0, colour_classes=COLOUR_CLASSES)
    loss = out.loss + aux(out.lr_features, out.hr_features, batch, out.selection_maps)
    loss.backward()
    assert torch.isfinite(loss) and backbone.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="the data has 8 colour classes, the objective 5: set model.aux_objective"):
        SyntheticAuxLoss(24).fit_to_data(data)  # the tile task's 5
    aux.fit_to_data(data)
    SyntheticAuxLoss(24).fit_to_data(SyntheticVQADataModule())


@pytest.mark.parametrize("mode", ["lr_only", "hd", "xattn", "flex_attention_ratio"])
def test_task_config_stacks_on_the_base_and_each_mode(mode, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
              "--config", str(ROOT / "experiments" / "regions" / "task.yaml"),
              "--config", str(ROOT / "experiments" / "synthetic" / f"{mode}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: flexvlm.data.datamodule.RegionsVQADataModule" in printed
    assert "image_size: 64" in printed and "max_new_tokens: 7" in printed and "colour_classes: 8" in printed


def test_a_fit_with_too_few_colour_classes_stops_at_set_up_with_the_setting_to_change(tmp_path):
    with pytest.raises(ValueError, match="the data has 8 colour classes, the objective 7"):
        main(["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
              "--config", str(ROOT / "experiments" / "regions" / "task.yaml"),
              "--model.aux_objective.init_args.colour_classes", "7", "--trainer.max_steps", "1",
              "--data.init_args.num_train", "4", "--data.init_args.num_val", "2", "--data.init_args.num_test", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
