"""Selection strategies against hand-computed cases and a naive version of the release's rule."""

import math
import pickle
import sys
from pathlib import Path
import textwrap

import pytest
import torch

from flexvlm.models.geometry import square_layout
from flexvlm.registry import Registry
from flexvlm.selection import (
    SELECTION, AllSelection, AttentionSelection, CenterSelection, MassSelection, NoSelection, RandomSelection,
    SelectionContext, SelectionStrategy, SoftSelection, build_selection, valid_grid,
)


def _ctx(b=2, g=4, zoom=3, box=None, layer=1):
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b) if box is None else box
    return SelectionContext(square_layout(valid_grid(box, g), valid_grid(box, g * zoom)), layer)


def naive_release_rule(attn_map, lr_valid, threshold, blocks, hr_grid):
    """Loops: zero border, min-max, binarise, max-pool to blocks, nearest up to the HR grid."""
    g = attn_map.shape[-1]
    m = attn_map * lr_valid
    m = (m - m.min()) / (m.max() - m.min())
    binary = m * 255 > threshold
    out = torch.zeros(hr_grid, hr_grid, dtype=torch.bool)
    for bi in range(blocks):
        for bj in range(blocks):
            # adaptive max pool cell bounds
            r0, r1 = (bi * g) // blocks, -((-(bi + 1) * g) // blocks)
            c0, c1 = (bj * g) // blocks, -((-(bj + 1) * g) // blocks)
            if binary[r0:r1, c0:c1].any():
                for r in range(hr_grid):
                    for c in range(hr_grid):
                        if (r * blocks) // hr_grid == bi and (c * blocks) // hr_grid == bj:
                            out[r, c] = True
    return out


@pytest.mark.parametrize("g,zoom,blocks", [(4, 3, None), (6, 3, 3), (24, 3, 9)])
def test_attention_threshold_matches_naive_release_rule(g, zoom, blocks):
    torch.manual_seed(g)
    attn = torch.rand(2, 3, g, g) ** 4
    ctx = _ctx(b=2, g=g, zoom=zoom)
    got = AttentionSelection(threshold=48, block_grid=blocks)(attn, ctx)
    for b in range(2):
        for r in range(3):
            ref = naive_release_rule(attn[b, r], ctx.lr_valid[b], 48, blocks or g, g * zoom)
            assert torch.equal(got[b, r], ref)


def test_ratio_and_top_k_budgets_and_block_structure():
    torch.manual_seed(0)
    attn = torch.rand(2, 5, 4, 4)
    ctx = _ctx()
    by_ratio = AttentionSelection(ratio=0.25)(attn, ctx)  # 16 blocks of 3 x 3 HR tokens -> 4 blocks
    assert (by_ratio.flatten(2).sum(-1) == 4 * 9).all()
    by_k = AttentionSelection(top_k=2)(attn, ctx)
    assert (by_k.flatten(2).sum(-1) == 2 * 9).all()
    # the two kept blocks are the two largest attention cells
    best = attn.flatten(2).topk(2).indices
    for b in range(2):
        for r in range(5):
            for cell in best[b, r].tolist():
                assert by_k[b, r, 3 * (cell // 4), 3 * (cell % 4)]
    # block structure: every 3 x 3 block is all-or-nothing
    blocks = by_ratio.view(2, 5, 4, 3, 4, 3).float()
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))


def test_random_is_seeded_and_has_the_budget():
    attn = torch.zeros(2, 4, 4, 4)
    a = RandomSelection(ratio=0.25, seed=7)(attn, _ctx())
    b = RandomSelection(ratio=0.25, seed=7)(attn, _ctx())
    c = RandomSelection(ratio=0.25, seed=8)(attn, _ctx())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.flatten(2).sum(-1) == 36).all()
    # rows draw independently
    assert not all(torch.equal(a[0, 0], a[0, r]) for r in range(1, 4))


def test_center_picks_the_central_blocks():
    attn = torch.zeros(1, 1, 4, 4)
    mask = CenterSelection(top_k=4)(attn, _ctx(b=1))
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[3:9, 3:9] = True
    assert torch.equal(mask[0, 0], expected)


def test_margin_rule_excludes_padding_border():
    # a wide image padded top and bottom: content rows 0.25 .. 0.75 of the square
    box = torch.tensor([[0.25, 0.0, 0.75, 1.0]])
    ctx = _ctx(b=1, box=box)
    assert ctx.lr_valid[0].all(-1).tolist() == [False, True, True, False]
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 0, 0] = 1.0  # all attention on a border cell: it must not win
    attn[0, 0, 1, 2] = 0.5
    mask = AttentionSelection(top_k=1)(attn, ctx)
    assert mask[0, 0, 3:6, 6:9].all() and mask.sum() == 9
    for strategy in (RandomSelection(top_k=3, seed=0), CenterSelection(top_k=3), AllSelection()):
        sel = strategy(attn, ctx)
        assert not sel[0, 0, :3].any() and not sel[0, 0, 9:].any()
    assert AllSelection()(attn, ctx).sum() == 6 * 12
    assert NoSelection()(attn, ctx).sum() == 0


def test_whole_blocks_keep_the_padding_of_a_selected_block():
    """The release keeps a selected block whole on a padded image; the default cuts it to the image."""
    box = torch.tensor([[0.25, 0.0, 0.75, 1.0]])  # HR rows 3 .. 8 of 12 are the image (LR rows 1, 2 of 4)
    ctx = _ctx(b=1, box=box)
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 1, 0] = 1.0  # on the image, in the top-left block of the 2 x 2 block grid (6 x 6 HR tokens)
    whole = torch.zeros(12, 12, dtype=torch.bool)
    whole[0:6, 0:6] = True
    cut = torch.zeros(12, 12, dtype=torch.bool)
    cut[3:6, 0:6] = True
    assert torch.equal(AttentionSelection(threshold=48, block_grid=2, whole_blocks=True)(attn, ctx)[0, 0], whole)
    assert torch.equal(AttentionSelection(threshold=48, block_grid=2)(attn, ctx)[0, 0], cut)
    # blocks of padding alone are never selected, whole or not
    assert not CenterSelection(top_k=4, block_grid=4, whole_blocks=True)(attn, ctx)[0, 0, :3].any()


def test_invalid_arguments_fail_clearly():
    with pytest.raises(ValueError, match="exactly one"):
        AttentionSelection(ratio=0.1, top_k=3)
    with pytest.raises(ValueError, match="ratio"):
        RandomSelection(ratio=1.5)
    with pytest.raises(ValueError, match="valid names: .*attention.*center"):
        build_selection("atention")


class EveryOtherRow(SelectionStrategy):
    """A strategy defined outside the package: the first high-res row of tokens."""

    def select(self, attn_map, ctx):
        mask = torch.zeros(*attn_map.shape[:2], ctx.hr_grid, ctx.hr_grid, dtype=torch.bool)
        mask[..., 0, :] = True
        return mask


def test_plugin_instance_and_bad_plugin_output():
    assert build_selection(EveryOtherRow()).select(torch.zeros(1, 1, 4, 4), _ctx(b=1)).sum() == 12

    class Broken(SelectionStrategy):
        def select(self, attn_map, ctx):
            return torch.zeros(3, 3)

    with pytest.raises(ValueError, match="expected"):
        Broken()(torch.zeros(1, 1, 4, 4), _ctx(b=1))


def _install_plugin(folder: Path, module: str, code: str, entry_point: str) -> None:
    """An installed package ``<module>-plugin`` of one module, with ``entry_point`` (name = module:Class)
    in the ``flexvlm.selection`` group (put ``folder`` on sys.path to see it)."""
    (folder / f"{module}.py").write_text(textwrap.dedent(code))
    dist = folder / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[flexvlm.selection]\n{entry_point}\n")


def test_plugin_through_entry_point(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "my_plugin", """
        import torch
        from flexvlm.selection import SelectionStrategy

        class Corner(SelectionStrategy):
            def select(self, attn_map, ctx):
                mask = torch.zeros(*attn_map.shape[:2], ctx.hr_grid, ctx.hr_grid, dtype=torch.bool)
                mask[..., 0, 0] = True
                return mask
    """, "corner = my_plugin:Corner")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("selection strategy", group="flexvlm.selection")
    assert "corner" in registry.names()
    mask = registry.get("corner")()(torch.zeros(1, 1, 4, 4), _ctx(b=1))
    assert mask.sum() == 1 and mask[0, 0, 0, 0]
    assert set(SELECTION.names()) >= {"attention", "random", "center", "all", "none"}
    sys.modules.pop("my_plugin", None)


def test_a_broken_plugin_fails_alone_naming_its_package(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "broken_plugin", "raise RuntimeError('a bug in the plugin')", "broken = broken_plugin:Strategy")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("selection strategy", group="flexvlm.selection")
    registry.register("attention")(AttentionSelection)
    assert registry.get("attention") is AttentionSelection  # the other names still work
    with pytest.raises(ImportError, match=r"'broken' .*package 'broken-plugin'.*RuntimeError: a bug in the plugin"):
        registry.get("broken")
    with pytest.raises(ValueError, match=r"unknown selection strategy 'brokn'.*failed to load: \['broken'\]"):
        registry.get("brokn")


def test_repr_names_the_settings_and_survives_a_copy():
    """The repr enters the key of a test's answers: settings, defaults included, never an address."""
    strategy = RandomSelection(top_k=2, seed=3)
    assert repr(strategy) == "RandomSelection(ratio=0.1, top_k=2, block_grid=None, seed=3, whole_blocks=False)"
    assert repr(pickle.loads(pickle.dumps(strategy))) == repr(strategy)
    assert repr(AttentionSelection(ratio=0.25)) != repr(AttentionSelection(ratio=0.5))
    assert repr(AllSelection()) == "AllSelection()"


def test_readme_plugin_example_runs():
    """The strategy printed in the README works as the README says."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Writing a selection strategy", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 2, 1] = 1.0
    mask = namespace["TopCell"]()(attn, _ctx(b=1))
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[6:9, 3:6] = True
    assert torch.equal(mask[0, 0], expected)


def test_margin_rules_on_a_padded_image_are_hand_computed():
    """A 10 x 7 image padded to 10 x 10: 1 px of padding on top, 2 below (top 0.1, bottom 0.8)."""
    box = torch.tensor([[0.1, 0.0, 0.8, 1.0]])
    rows = lambda grid: grid[0, :, 0].nonzero().flatten().tolist()  # noqa: E731
    # centre rule on 24 rows: a row counts when (r + 0.5) / 24 lies in [0.1, 0.8): rows 2 .. 18
    assert rows(valid_grid(box, 24)) == list(range(2, 19))
    # the release: floor(24 x 0.1) = 2 rows off at both ends, whatever the far margin: rows 2 .. 21
    assert rows(valid_grid(box, 24, "release")) == list(range(2, 22))
    assert valid_grid(box, 24, "release")[0, 2].all()  # columns untouched: no horizontal padding
    # a square margin the two rules agree on: 1/4 of 24 cells is exactly 6 (floor must not give 5)
    quarter = torch.tensor([[0.25, 0.0, 0.75, 1.0]])
    assert rows(valid_grid(quarter, 24, "release")) == rows(valid_grid(quarter, 24)) == list(range(6, 18))
    with pytest.raises(ValueError, match="unknown margin rule"):
        valid_grid(box, 24, "middle")


def naive_mass_rule(attn_map, lr_valid, mass, max_ratio):
    """One row: cells by share of the row's attention over the image, most first (ties: the earlier),
    taken until the mass taken reaches ``mass`` or the cap is hit -> the set of (row, col) cells."""
    cells = [(i, j) for i in range(attn_map.shape[0]) for j in range(attn_map.shape[1]) if lr_valid[i, j]]
    total = sum(float(attn_map[c]) for c in cells)
    ranked = sorted(cells, key=lambda c: (-float(attn_map[c]) / total, c[0] * attn_map.shape[1] + c[1]))
    cap = max(1, round(len(cells) * max_ratio))
    taken, held = [], 0.0
    for cell in ranked:
        if len(taken) == cap or (taken and held >= mass):
            break
        taken.append(cell)
        held += float(attn_map[cell]) / total
    return set(taken)


@pytest.mark.parametrize("mass,max_ratio", [(0.5, 1.0), (0.9, 1.0), (0.9, 0.25), (1e-6, 1.0), (1.0, 1.0)])
def test_mass_selection_matches_the_naive_rule_per_row(mass, max_ratio):
    torch.manual_seed(5)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]])  # the second: a padded image
    ctx = _ctx(b=2, box=box)
    attn = torch.rand(2, 3, 4, 4) ** 4  # peaked and diffuse rows alike
    attn[0, 1] = 0.0
    attn[0, 1, 2, 3] = 1.0  # one cell holds everything: one cell
    mask = MassSelection(mass=mass, max_ratio=max_ratio)(attn, ctx)
    for b in range(2):
        for r in range(3):
            cells = naive_mass_rule(attn[b, r], ctx.lr_valid[b], mass, max_ratio)
            expected = torch.zeros(12, 12, dtype=torch.bool)
            for i, j in cells:
                expected[3 * i : 3 * i + 3, 3 * j : 3 * j + 3] = True
            assert torch.equal(mask[b, r], expected & ctx.hr_valid[b]), (b, r)
    assert int(mask[0, 1].sum()) == 9  # the peaked row: one cell of 3 x 3 high-res tokens


def test_mass_selection_is_refused_outside_its_range_and_named():
    with pytest.raises(ValueError, match="mass must be in"):
        MassSelection(mass=0.0)
    with pytest.raises(ValueError, match="max_ratio must be in"):
        MassSelection(max_ratio=1.5)
    assert isinstance(build_selection("attention_mass"), MassSelection)


@pytest.mark.parametrize("sharpness", [0.0, 0.5, 1.0])
def test_soft_selection_keeps_the_attention_keys_and_weighs_them_by_their_cell(sharpness):
    """Its mask is AttentionSelection's with the same budget; a high-res token's bias is sharpness *
    log(a_cell / a_max) of its row, a_max over the image's valid cells (naive loops)."""
    torch.manual_seed(6)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 1.0]])  # the second: a padded image
    ctx = _ctx(b=2, box=box)
    attn = torch.rand(2, 3, 4, 4) ** 3
    soft = SoftSelection(ratio=0.25, sharpness=sharpness)
    assert torch.equal(soft(attn, ctx), AttentionSelection(ratio=0.25)(attn, ctx))
    bias = soft.key_bias(attn, ctx)
    for b in range(2):
        for r in range(3):
            valid_cells = [float(attn[b, r, i, j]) for i in range(4) for j in range(4) if ctx.lr_valid[b, i, j]]
            top = max(valid_cells)
            for y in range(12):
                for x in range(12):
                    if ctx.hr_valid[b, y, x]:
                        expected = sharpness * math.log(float(attn[b, r, y // 3, x // 3]) / top)
                        assert abs(float(bias[b, r, y, x]) - expected) < 1e-5, (b, r, y, x)
    assert SoftSelection().weighs_keys and not AttentionSelection().weighs_keys
    assert isinstance(build_selection("soft"), SoftSelection)
    with pytest.raises(ValueError, match="sharpness must be"):
        SoftSelection(sharpness=-1.0)
