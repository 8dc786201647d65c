"""The built-in high-resolution VQA task: read the digit on the tile of a given colour.

A 96 x 96 image (zoom 3 -> 32 x 32 low-res view, patch 8 -> LR grid 4 x 4, HR grid 12 x 12) on a
near-grey, blocky, noisy, cluttered background holds 2-4 tiles of distinct colours. Each tile is
exactly one HR patch, aligned to the patch grid, at most one per LR cell (zoom x zoom HR patches),
and carries a 5 x 7 digit. Downsampled by 3, the colour blob stays visible while the glyph shrinks
to a few grey values. Solid black digits (the default) leave enough ink in those values for a linear
probe that knows where the tile is to read about a third of them; ``fine_print=True`` draws each glyph pixel
alternately brighter and darker than the tile, so the glyph averages out of the low-res view and
reading it is a job for the high-resolution tokens alone.

Question: the colour word; answer: the digit. Every sample is a pure function of
(seed, split, index). Its auxiliary objectives (``flexvlm.losses.SyntheticAuxLoss``) train on
the targets that ``aux_targets`` adds to every sample.

The glyphs, the drawing, the targets and ``SceneDataset`` serve the second built-in task too
(``flexvlm.data.regions``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.visuals import ImageProcessor, SquareImages

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 200, 40),
}
COLOUR_NAMES = tuple(COLOURS)  # colour class c + 1 in the aux targets; 0 is background
DIGITS = tuple(str(d) for d in range(10))
WORDS = [*COLOUR_NAMES, *DIGITS]  # the WordTokenizer vocabulary of this task
INK_CONTRAST = 48  # how far the fine print's pixels sit above / below the tile colour
SPLITS = ("train", "val", "test")  # part of the random key, so splits never share a stream

# 5 x 7 bitmaps, one string per row, "#" = ink
GLYPHS = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_MASKS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in GLYPHS.items()}


Size = int | tuple[int, int]  # a side, or (height, width)


def pair(size: Size | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a side or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class Tile:
    """A coloured tile whose top-left HR patch is (row, col), ``size`` x ``size`` HR patches (the
    regions task's large tiles are 2 x 2, flexvlm.data.regions), its digit scaled to fill them."""

    row: int
    col: int
    colour: str
    digit: int
    size: int = 1

    def patches(self) -> list[tuple[int, int]]:
        """The HR patches it covers, row-major."""
        return [(self.row + r, self.col + c) for r in range(self.size) for c in range(self.size)]

    def cell(self, zoom: Size) -> tuple[int, int]:
        """The LR cell it lies in (a tile never straddles two)."""
        zoom_h, zoom_w = pair(zoom)
        return self.row // zoom_h, self.col // zoom_w


@dataclass(frozen=True)
class Scene:
    """A rendered sample: the raw image, its tiles and the tile asked about."""

    image: Image.Image
    tiles: tuple[Tile, ...]
    query: Tile

    @property
    def question(self) -> str:
        return self.query.colour

    @property
    def answer(self) -> str:
        return str(self.query.digit)


class RenderedScene(Protocol):
    """What a dataset needs of a task's scene."""

    image: Image.Image
    question: str
    answer: str


def check_geometry(image_size: Size, patch_size: int, zoom: Size) -> None:
    """A clear error for a geometry whose grids are not whole, or whose patches cannot hold a digit."""
    if any(side % (patch_size * z) for side, z in zip(pair(image_size), pair(zoom))):
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size * zoom ({patch_size} x {zoom})")
    if patch_size < 7:
        raise ValueError("patch_size must be >= 7 to hold a 5 x 7 digit")


def grids(image_size: Size, patch_size: int, zoom: Size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(low-res grid, high-res grid) as (rows, cols): the high-res grid has a token per patch, the
    low-res grid a cell per zoom x zoom patches (zoom per axis for a non-square image)."""
    (height, width), (zoom_h, zoom_w) = pair(image_size), pair(zoom)
    hr = (height // patch_size, width // patch_size)
    return (hr[0] // zoom_h, hr[1] // zoom_w), hr


def glyph_mask(digit: int, scale: int = 1) -> np.ndarray:
    """The digit's (7 scale, 5 scale) bitmap: each glyph pixel a scale x scale block."""
    return GLYPH_MASKS[digit].repeat(scale, axis=0).repeat(scale, axis=1)


def glyph_box(patch: np.ndarray, scale: int = 1) -> np.ndarray:
    """The (7 scale, 5 scale) view of a tile's pixels (side, side, 3) that holds its digit, centred."""
    height, width = 7 * scale, 5 * scale
    top, left = (patch.shape[0] - height) // 2, (patch.shape[1] - width) // 2
    return patch[top : top + height, left : left + width]


def paint_glyph(patch: np.ndarray, digit: int, colour: np.ndarray, polarity: float, scale: int = 1) -> None:
    """Write the digit, scaled by ``scale``, into a tile's pixels (side, side, 3) in fine print: its
    glyph pixels, in raster order, sit alternately INK_CONTRAST above and below the tile colour (first
    sign ``polarity``), so they average out in any downsampled view; scaled, each glyph pixel's block
    is a checkerboard of that sign and its opposite, which sums to nothing in the block and leaves
    the least that a low-pass filter keeps. The colour must leave that room."""
    if colour.min() < INK_CONTRAST or colour.max() > 255 - INK_CONTRAST:
        raise ValueError(f"fine print needs a colour in [{INK_CONTRAST}, {255 - INK_CONTRAST}], got {colour}")
    base = GLYPH_MASKS[digit]
    glyph_signs = np.zeros(base.shape)
    glyph_signs[base] = np.where(np.arange(base.sum()) % 2 == 0, polarity, -polarity)
    checker = (-1.0) ** np.add.outer(np.arange(scale), np.arange(scale))
    signs = np.kron(glyph_signs, checker)
    mask = glyph_mask(digit, scale)
    glyph_box(patch, scale)[mask] = colour + signs[mask][:, None] * INK_CONTRAST


def layout_tiles(
    rng: np.random.Generator, image_size: Size, patch_size: int, zoom: Size, num_tiles: tuple[int, int]
) -> list[Tile]:
    """Distinct colours in distinct LR cells, each at a random HR patch inside its cell."""
    (lr_rows, lr_cols), _ = grids(image_size, patch_size, zoom)
    zoom_h, zoom_w = pair(zoom)
    count = int(rng.integers(num_tiles[0], num_tiles[1] + 1))
    colours = rng.permutation(len(COLOUR_NAMES))[:count]
    cells = rng.choice(lr_rows * lr_cols, size=count, replace=False)
    tiles = []
    for colour, cell in zip(colours, cells):
        offset_row, offset_col = rng.integers(0, np.array([zoom_h, zoom_w]))
        tiles.append(
            Tile(
                row=int(cell // lr_cols * zoom_h + offset_row),
                col=int(cell % lr_cols * zoom_w + offset_col),
                colour=COLOUR_NAMES[colour],
                digit=int(rng.integers(10)),
            )
        )
    return tiles


def draw_scene(
    tiles: Sequence[Tile], image_size: Size, patch_size: int, rng: np.random.Generator, fine_print: bool = False,
    colours: Mapping[str, tuple[int, int, int]] = COLOURS,
) -> Image.Image:
    """Paint the background, clutter, tiles (their RGB from ``colours``) and noise.

    The random draws do not depend on the digits, so the same rng state and tiles that differ
    only in a digit give images that differ only in that digit's pixels.
    """
    # blocky near-grey background: half-patch blocks, a faint per-block tint
    block = patch_size // 2
    height, width = pair(image_size)
    blocks = (height // block, width // block)
    grey = rng.uniform(90, 166, (*blocks, 1)) + rng.uniform(-6, 6, (*blocks, 3))
    canvas = grey.astype(np.float32).repeat(block, axis=0).repeat(block, axis=1)
    # grey clutter rectangles: edges and dark strokes that are not tiles
    count = int(rng.integers(4, 9))
    sizes = rng.integers(2, 2 * patch_size, (count, 2))
    corners = rng.integers(0, np.array([height - 1, width - 1]), (count, 2))
    for (rect_h, rect_w), (top, left), value in zip(sizes, corners, rng.uniform(40, 215, count)):
        canvas[top : top + rect_h, left : left + rect_w] = value
    for tile in tiles:
        colour = np.array(colours[tile.colour]) + rng.uniform(-20, 20, size=3)
        if fine_print:  # room for the fine print above and below
            colour = colour.clip(INK_CONTRAST, 255 - INK_CONTRAST)
        top, left, side = tile.row * patch_size, tile.col * patch_size, tile.size * patch_size
        patch = canvas[top : top + side, left : left + side]
        patch[:] = colour
        if fine_print:
            # a random polarity: what little of the glyph survives downsampling has a random sign
            paint_glyph(patch, tile.digit, colour, polarity=rng.choice([-1.0, 1.0]), scale=tile.size)
        else:
            glyph_box(patch, tile.size)[glyph_mask(tile.digit, tile.size)] = 0
    canvas += 6 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


def render_sample(
    seed: int,
    index: int,
    *,
    split: str = "train",
    image_size: Size = 96,
    patch_size: int = 8,
    zoom: Size = 3,
    num_tiles: tuple[int, int] = (2, 4),
    fine_print: bool = False,
) -> Scene:
    """The raw scene of sample `index` of (seed, split): image, tiles and the queried tile."""
    check_geometry(image_size, patch_size, zoom)
    if not 1 <= num_tiles[0] <= num_tiles[1] <= len(COLOUR_NAMES):
        raise ValueError(f"num_tiles must satisfy 1 <= min <= max <= {len(COLOUR_NAMES)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    tiles = layout_tiles(rng, image_size, patch_size, zoom, num_tiles)
    query = tiles[int(rng.integers(len(tiles)))]
    return Scene(draw_scene(tiles, image_size, patch_size, rng, fine_print), tuple(tiles), query)


def cell_index(tile: Tile, image_size: Size, patch_size: int, zoom: Size) -> int:
    """The row-major index of the tile's LR cell."""
    (_, lr_cols), _ = grids(image_size, patch_size, zoom)
    row, col = tile.cell(zoom)
    return row * lr_cols + col


def token_targets(
    tiles: Sequence[Tile], image_size: Size, patch_size: int, zoom: Size, colour_names: Sequence[str] = COLOUR_NAMES
) -> dict[str, torch.Tensor]:
    """Dense targets, row-major over the token grids: colour class (``colour_names`` index + 1,
    0 = background) of every LR and HR token, digit of every HR token a tile covers (IGNORE_INDEX
    elsewhere)."""
    (lr_rows, lr_cols), (hr_rows, hr_cols) = grids(image_size, patch_size, zoom)
    lr_colour = torch.zeros(lr_rows * lr_cols, dtype=torch.long)
    hr_colour = torch.zeros(hr_rows * hr_cols, dtype=torch.long)
    hr_digit = torch.full((hr_rows * hr_cols,), IGNORE_INDEX, dtype=torch.long)
    for tile in tiles:
        colour_class = colour_names.index(tile.colour) + 1
        lr_colour[cell_index(tile, image_size, patch_size, zoom)] = colour_class
        for row, col in tile.patches():
            hr_colour[row * hr_cols + col] = colour_class
            hr_digit[row * hr_cols + col] = tile.digit
    return {"aux_lr_colour": lr_colour, "aux_hr_colour": hr_colour, "aux_hr_digit": hr_digit}


def aux_targets(
    tiles: Sequence[Tile], query: Tile, image_size: Size, patch_size: int, zoom: Size
) -> dict[str, torch.Tensor]:
    """``token_targets``, and the LR cell of the queried tile."""
    query_cell = torch.tensor(cell_index(query, image_size, patch_size, zoom))
    return {**token_targets(tiles, image_size, patch_size, zoom), "aux_query_cell": query_cell}


class SceneDataset(torch.utils.data.Dataset):
    """What the generated tasks share: `num_samples` samples, sample i a pure function of (seed, split, i):
    a scene (``scene``: its image, question and answer) and its other entries (``annotations``).

    ``image_size`` and ``zoom`` may be (height, width): a non-square scene, for an architecture whose
    preprocessing takes any aspect ratio; its ``processor`` (the model's, ``flexvlm.data.visuals``)
    then turns the image into what the model takes. The default, for a square scene, is LLaVA-1.5's
    (pad, resize to ``image_size``, normalise with ``mean`` and ``std``)."""

    name = "synthetic"  # the question ids' prefix

    def __init__(
        self, num_samples: int, seed: int, image_size: Size, patch_size: int, zoom: Size, split: str,
        mean: tuple[float, float, float], std: tuple[float, float, float], processor: ImageProcessor | None,
    ) -> None:
        check_geometry(image_size, patch_size, zoom)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.patch_size, self.zoom = image_size, patch_size, zoom
        self.mean, self.std = mean, std
        self.processor = processor  # the datamodule sets the model's once it knows the model

    def scene(self, index: int) -> RenderedScene:
        """The raw scene of sample ``index``."""
        raise NotImplementedError

    def annotations(self, scene: RenderedScene) -> dict:
        """The sample's entries beyond its image, question and answer: its auxiliary targets, and
        whatever else the task labels its samples with."""
        raise NotImplementedError

    def _image_entries(self, image: Image.Image) -> dict:
        if self.processor is not None:
            return self.processor.process(image)
        height, width = pair(self.image_size)
        if height != width:
            raise ValueError(f"a {height} x {width} scene needs the model's image processor: LLaVA-1.5's "
                             f"preprocessing takes square scenes (image_size a single side)")
        return SquareImages(height, self.mean, self.std).process(image)

    def __len__(self) -> int:
        return self.num_samples

    def sample_ids(self) -> list[str]:
        return [self._sample_id(i) for i in range(self.num_samples)]

    def _sample_id(self, index: int) -> str:
        return f"{self.name}-{self.split}-{self.seed}-{index}"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        scene = self.scene(index)
        return {
            **self._image_entries(scene.image),
            "question": scene.question,
            "answer": scene.answer,
            "answers": [scene.answer],
            "question_id": self._sample_id(index),
            **self.annotations(scene),
        }


class SyntheticVQA(SceneDataset):
    """The tile task's samples (``render_sample``); geometry and image handling as ``SceneDataset``'s."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        image_size: Size = 96,
        patch_size: int = 8,
        zoom: Size = 3,
        split: str = "train",
        num_tiles: tuple[int, int] = (2, 4),
        fine_print: bool = False,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        processor: ImageProcessor | None = None,
    ) -> None:
        super().__init__(num_samples, seed, image_size, patch_size, zoom, split, mean, std, processor)
        self.num_tiles, self.fine_print = tuple(num_tiles), fine_print

    def scene(self, index: int) -> Scene:
        return render_sample(
            self.seed,
            index,
            split=self.split,
            image_size=self.image_size,
            patch_size=self.patch_size,
            zoom=self.zoom,
            num_tiles=self.num_tiles,
            fine_print=self.fine_print,
        )

    def annotations(self, scene: Scene) -> dict:
        return aux_targets(scene.tiles, scene.query, self.image_size, self.patch_size, self.zoom)
