"""The second built-in task, "regions": answers read from several places, targets of two sizes, and
questions whose place is found through another tile (docs/regions-task.md).

A 192 x 192 image (zoom 3 -> 64 x 64 low-res view, patch 8 -> LR grid 8 x 8, HR grid 24 x 24) on the
tile task's background (``flexvlm.data.synthetic.draw_scene``) holds, at most one per LR cell:

- 3-6 coloured tiles of distinct colours (of ``num_colours``), each with a digit;
- plain (light grey) tiles with a digit, at least two beside each of two coloured "markers", in two
  directions of which the markers share one, and 1-3 more anywhere.

A tile is small (one HR patch, a 5 x 7 glyph) or large (2 x 2 HR patches, the glyph scaled by 2),
at any position inside its LR cell, every glyph in fine print: the low-res view shows where the
tiles are and their colours, never their digits.

Questions (``question_kind``):

- ``read``: 1-3 colours, e.g. "red blue green"; the answer names each colour and reads its digit,
  in the order asked, "red 3 blue 7 green 1", so a selection fixed before decoding must keep every
  one of those cells, while each digit is predicted at the colour word that names its tile;
- ``relational``: a direction and a marker's colour, e.g. "right red"; the answer is the digit of
  the plain tile in the LR cell next to that marker in that direction. The other marker has a plain
  tile in the same direction and each marker one in another direction, so neither the colour nor the
  direction alone tells which tile to read.

``target_size`` is ``small``, ``large`` or ``mixed``: the sizes of the tiles the answer is read from.
Every sample is a pure function of (seed, split, index).
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.synthetic import COLOURS as TILE_TASK_COLOURS
from flexvlm.data.synthetic import (
    DIGITS,
    SPLITS,
    SceneDataset,
    Size,
    Tile,
    cell_index,
    check_geometry,
    draw_scene,
    grids,
    pair,
    token_targets,
)
from flexvlm.data.visuals import ImageProcessor

COLOURS: dict[str, tuple[int, int, int]] = {
    **TILE_TASK_COLOURS,
    "purple": (150, 60, 190),
    "cyan": (40, 190, 200),
}
COLOUR_NAMES = tuple(COLOURS)
PLAIN = "plain"
PAINTS = {**COLOURS, PLAIN: (200, 200, 200)}  # every tile's RGB, for draw_scene
CLASS_NAMES = (*COLOUR_NAMES, PLAIN)  # colour class c + 1 in the aux targets; 0 is background
COLOUR_CLASSES = len(CLASS_NAMES) + 1  # SyntheticAuxLoss(colour_classes=...) for this task
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (row, col) steps
WORDS = [*COLOUR_NAMES, *DIRECTIONS, *DIGITS]  # the WordTokenizer vocabulary of this task
MAX_READ = 3  # colours a read question names at most
ANSWER_ROWS = 2 * MAX_READ + 1  # a read answer's colour words, digits and end token: aux_query_cell's length
MIN_COLOURS = MAX_READ
EXTRA_PLAIN = (1, 3)  # plain tiles anywhere, beyond the markers' four
MIN_LR_GRID = 4  # per side: room for the two markers, their plain tiles and the rest, whatever the draw
LARGE = 2  # a large tile's side in HR patches

Cell = tuple[int, int]


@dataclass(frozen=True)
class RegionScene:
    """A rendered sample: the image, its tiles, the question and the tiles its answer reads, in order."""

    image: Image.Image
    tiles: tuple[Tile, ...]
    question: str
    asked: tuple[Tile, ...]
    kind: str  # "read" or "relational"

    @property
    def answer(self) -> str:
        """A read answer names each tile before its digit ("red 3 blue 7"), so that every digit is
        predicted at the word that names its tile, as in the tile task; a relational one is the digit."""
        if self.kind == "relational":
            return str(self.asked[0].digit)
        return " ".join(f"{tile.colour} {tile.digit}" for tile in self.asked)

    @property
    def target_size(self) -> str:
        sizes = {tile.size for tile in self.asked}
        return "mixed" if len(sizes) > 1 else "large" if sizes == {LARGE} else "small"


def check_task(image_size: Size, patch_size: int, zoom: Size, num_colours: int) -> None:
    """A clear error for a geometry that cannot hold the task's tiles, or an unknown colour count."""
    check_geometry(image_size, patch_size, zoom)
    if not MIN_COLOURS <= num_colours <= len(COLOUR_NAMES):
        raise ValueError(f"num_colours must be in [{MIN_COLOURS}, {len(COLOUR_NAMES)}] (a read question names up to "
                         f"{MAX_READ} distinct colours; the task has {len(COLOUR_NAMES)}), got {num_colours}")
    if min(pair(zoom)) < LARGE:
        raise ValueError(f"zoom {zoom}: a large tile ({LARGE} x {LARGE} HR patches) must fit in one LR cell, so "
                         f"zoom must be >= {LARGE} on each axis")
    lr_grid, _ = grids(image_size, patch_size, zoom)
    if min(lr_grid) < MIN_LR_GRID:
        raise ValueError(f"an LR grid of {lr_grid[0]} x {lr_grid[1]} cells cannot hold the task's tiles (up to "
                         f"{len(COLOUR_NAMES) + 4 + EXTRA_PLAIN[1]}, one a cell, two markers with plain tiles beside "
                         f"them): it needs at least {MIN_LR_GRID} x {MIN_LR_GRID}")


def neighbour(cell: Cell, direction: str, lr_grid: tuple[int, int]) -> Cell | None:
    """The cell next to ``cell`` in ``direction``, None outside the grid."""
    row, col = cell[0] + DIRECTIONS[direction][0], cell[1] + DIRECTIONS[direction][1]
    return (row, col) if 0 <= row < lr_grid[0] and 0 <= col < lr_grid[1] else None


def place_marker(rng: np.random.Generator, lr_grid: tuple[int, int], taken: set[Cell],
                 direction: str) -> tuple[Cell, Cell, Cell]:
    """A free cell for a marker and the free cells beside it, in ``direction`` and in one other
    direction (random), for its plain tiles."""
    options = []
    for cell in np.ndindex(*lr_grid):
        ahead = neighbour(cell, direction, lr_grid)
        if cell in taken or ahead is None or ahead in taken:
            continue
        for other in DIRECTIONS:
            beside = neighbour(cell, other, lr_grid)
            if other != direction and beside is not None and beside not in taken:
                options.append((cell, ahead, beside))
    return options[int(rng.integers(len(options)))]  # never empty on a grid of MIN_LR_GRID (check_task)


def layout_cells(rng: np.random.Generator, lr_grid: tuple[int, int], num_colours: int
                 ) -> tuple[list[tuple[Cell, str]], str]:
    """The cells and colours of a scene's tiles, and the markers' shared direction. The first tile is
    the asked marker, the second its plain tile in that direction."""
    count = int(rng.integers(MIN_COLOURS, num_colours + 1))
    colours = [COLOUR_NAMES[c] for c in rng.permutation(num_colours)[:count]]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    placed: list[tuple[Cell, str]] = []
    for colour in colours[:2]:  # the two markers: only the colour tells them apart
        marker, ahead, beside = place_marker(rng, lr_grid, {cell for cell, _ in placed}, direction)
        placed += [(marker, colour), (ahead, PLAIN), (beside, PLAIN)]
    others = [*colours[2:], *[PLAIN] * int(rng.integers(EXTRA_PLAIN[0], EXTRA_PLAIN[1] + 1))]
    taken = {cell for cell, _ in placed}
    free = [cell for cell in np.ndindex(*lr_grid) if cell not in taken]
    for index, colour in zip(rng.choice(len(free), size=len(others), replace=False), others):
        placed.append((free[index], colour))
    return placed, direction


def tile_in_cell(rng: np.random.Generator, cell: Cell, colour: str, zoom: Size) -> Tile:
    """A small or large tile (even odds) at a random position inside the LR cell, a random digit."""
    zoom_h, zoom_w = pair(zoom)
    size = int(rng.choice([1, LARGE]))
    offset_row, offset_col = rng.integers(0, np.array([zoom_h - size + 1, zoom_w - size + 1]))
    return Tile(row=cell[0] * zoom_h + int(offset_row), col=cell[1] * zoom_w + int(offset_col), colour=colour,
                digit=int(rng.integers(10)), size=size)


def render_sample(
    seed: int,
    index: int,
    *,
    split: str = "train",
    image_size: Size = 192,
    patch_size: int = 8,
    zoom: Size = 3,
    num_colours: int = len(COLOUR_NAMES),
) -> RegionScene:
    """The raw scene of sample `index` of (seed, split): image, tiles, question, the tiles read."""
    check_task(image_size, patch_size, zoom, num_colours)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    lr_grid, _ = grids(image_size, patch_size, zoom)
    cells, direction = layout_cells(rng, lr_grid, num_colours)
    tiles = [tile_in_cell(rng, cell, colour, zoom) for cell, colour in cells]
    if rng.random() < 0.5:
        coloured = [tile for tile in tiles if tile.colour != PLAIN]
        picks = rng.choice(len(coloured), size=int(rng.integers(1, MAX_READ + 1)), replace=False)
        asked = tuple(coloured[i] for i in picks)
        kind, question = "read", " ".join(tile.colour for tile in asked)
    else:
        asked = (tiles[1],)  # the asked marker's plain tile in the shared direction
        kind, question = "relational", f"{direction} {tiles[0].colour}"
    image = draw_scene(tiles, image_size, patch_size, rng, fine_print=True, colours=PAINTS)
    return RegionScene(image, tuple(tiles), question, asked, kind)


def query_cells(scene: RegionScene, image_size: Size, patch_size: int, zoom: Size) -> torch.Tensor:
    """(ANSWER_ROWS,) the LR cell each answer token is read from, in the order of the rows that predict
    them: IGNORE_INDEX for a read answer's colour words (copied from the question), its end token and
    the rows a shorter answer lacks. The grounding target of the rows that predict the answer."""
    cells = [cell_index(tile, image_size, patch_size, zoom) for tile in scene.asked]
    if scene.kind == "read":
        cells = [row for cell in cells for row in (IGNORE_INDEX, cell)]
    return torch.tensor(cells + [IGNORE_INDEX] * (ANSWER_ROWS - len(cells)))


class RegionsVQA(SceneDataset):
    """The regions task's samples (``render_sample``); geometry and image handling as ``SceneDataset``'s.
    Beyond the tile task's entries: ``tags``, its ``question_kind``, ``target_size`` and ``regions`` (the
    tiles read), which every answer keeps (answers.jsonl), to split results by."""

    name = "regions"

    def __init__(
        self,
        num_samples: int,
        seed: int,
        image_size: Size = 192,
        patch_size: int = 8,
        zoom: Size = 3,
        split: str = "train",
        num_colours: int = len(COLOUR_NAMES),
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        processor: ImageProcessor | None = None,
    ) -> None:
        check_task(image_size, patch_size, zoom, num_colours)
        super().__init__(num_samples, seed, image_size, patch_size, zoom, split, mean, std, processor)
        self.num_colours = num_colours

    def scene(self, index: int) -> RegionScene:
        return render_sample(self.seed, index, split=self.split, image_size=self.image_size,
                             patch_size=self.patch_size, zoom=self.zoom, num_colours=self.num_colours)

    def annotations(self, scene: RegionScene) -> dict:
        geometry = (self.image_size, self.patch_size, self.zoom)
        return {
            # kept with each answer; ``regions``: how many tiles the answer is read from
            "tags": {"question_kind": scene.kind, "target_size": scene.target_size, "regions": len(scene.asked)},
            **token_targets(scene.tiles, *geometry, colour_names=CLASS_NAMES),
            "aux_query_cell": query_cells(scene, *geometry),
        }
