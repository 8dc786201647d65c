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
"""

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Tile:
    """A coloured tile occupying HR patch (row, col)."""

    row: int
    col: int
    colour: str
    digit: int


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


Size = int | tuple[int, int]  # a side, or (height, width)


def _pair(size: Size | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_geometry(image_size: Size, patch_size: int, zoom: Size) -> None:
    if any(side % (patch_size * z) for side, z in zip(_pair(image_size), _pair(zoom))):
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size * zoom ({patch_size} x {zoom})")
    if patch_size < 7:
        raise ValueError("patch_size must be >= 7 to hold a 5 x 7 digit")


def grids(image_size: Size, patch_size: int, zoom: Size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(low-res grid, high-res grid) as (rows, cols): the high-res grid has a token per patch, the
    low-res grid a cell per zoom x zoom patches (zoom per axis for a non-square image)."""
    (height, width), (zoom_h, zoom_w) = _pair(image_size), _pair(zoom)
    hr = (height // patch_size, width // patch_size)
    return (hr[0] // zoom_h, hr[1] // zoom_w), hr


def glyph_box(patch: np.ndarray) -> np.ndarray:
    """The 7 x 5 view of a tile's pixels (patch_size, patch_size, 3) that holds its digit, centred."""
    top, left = (patch.shape[0] - 7) // 2, (patch.shape[1] - 5) // 2
    return patch[top : top + 7, left : left + 5]


def paint_glyph(patch: np.ndarray, digit: int, colour: np.ndarray, polarity: float) -> None:
    """Write the digit into a tile's pixels (patch_size, patch_size, 3) in fine print: its pixels,
    in raster order, sit alternately INK_CONTRAST above and below the tile colour (first sign
    ``polarity``), so they average out in any downsampled view. The colour must leave that room."""
    if colour.min() < INK_CONTRAST or colour.max() > 255 - INK_CONTRAST:
        raise ValueError(f"fine print needs a colour in [{INK_CONTRAST}, {255 - INK_CONTRAST}], got {colour}")
    mask = GLYPH_MASKS[digit]
    signs = np.where(np.arange(mask.sum()) % 2 == 0, polarity, -polarity)
    glyph_box(patch)[mask] = colour + signs[:, None] * INK_CONTRAST


def layout_tiles(
    rng: np.random.Generator, image_size: Size, patch_size: int, zoom: Size, num_tiles: tuple[int, int]
) -> list[Tile]:
    """Distinct colours in distinct LR cells, each at a random HR patch inside its cell."""
    (lr_rows, lr_cols), _ = grids(image_size, patch_size, zoom)
    zoom_h, zoom_w = _pair(zoom)
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
    tiles: Sequence[Tile], image_size: Size, patch_size: int, rng: np.random.Generator, fine_print: bool = False
) -> Image.Image:
    """Paint the background, clutter, tiles and noise.

    The random draws do not depend on the digits, so the same rng state and tiles that differ
    only in a digit give images that differ only in that digit's pixels.
    """
    # blocky near-grey background: half-patch blocks, a faint per-block tint
    block = patch_size // 2
    height, width = _pair(image_size)
    blocks = (height // block, width // block)
    grey = rng.uniform(90, 166, (*blocks, 1)) + rng.uniform(-6, 6, (*blocks, 3))
    canvas = grey.astype(np.float32).repeat(block, axis=0).repeat(block, axis=1)
    # grey clutter rectangles: edges and dark strokes that are not tiles
    count = int(rng.integers(4, 9))
    sizes = rng.integers(2, 2 * patch_size, (count, 2))
    corners = rng.integers(0, np.array([height - 1, width - 1]), (count, 2))
    for (height, width), (top, left), value in zip(sizes, corners, rng.uniform(40, 215, count)):
        canvas[top : top + height, left : left + width] = value
    for tile in tiles:
        colour = np.array(COLOURS[tile.colour]) + rng.uniform(-20, 20, size=3)
        if fine_print:  # room for the fine print above and below
            colour = colour.clip(INK_CONTRAST, 255 - INK_CONTRAST)
        top, left = tile.row * patch_size, tile.col * patch_size
        patch = canvas[top : top + patch_size, left : left + patch_size]
        patch[:] = colour
        if fine_print:
            # a random polarity: what little of the glyph survives downsampling has a random sign
            paint_glyph(patch, tile.digit, colour, polarity=rng.choice([-1.0, 1.0]))
        else:
            glyph_box(patch)[GLYPH_MASKS[tile.digit]] = 0
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
    _check_geometry(image_size, patch_size, zoom)
    if not 1 <= num_tiles[0] <= num_tiles[1] <= len(COLOUR_NAMES):
        raise ValueError(f"num_tiles must satisfy 1 <= min <= max <= {len(COLOUR_NAMES)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    tiles = layout_tiles(rng, image_size, patch_size, zoom, num_tiles)
    query = tiles[int(rng.integers(len(tiles)))]
    return Scene(draw_scene(tiles, image_size, patch_size, rng, fine_print), tuple(tiles), query)


def aux_targets(
    tiles: Sequence[Tile], query: Tile, image_size: Size, patch_size: int, zoom: Size
) -> dict[str, torch.Tensor]:
    """Dense targets, row-major over the token grids: colour class (0 = background) of every
    LR and HR token, digit of every HR tile token (IGNORE_INDEX elsewhere), and the LR cell of the
    queried tile."""
    (lr_rows, lr_cols), (hr_rows, hr_cols) = grids(image_size, patch_size, zoom)
    zoom_h, zoom_w = _pair(zoom)
    lr_colour = torch.zeros(lr_rows * lr_cols, dtype=torch.long)
    hr_colour = torch.zeros(hr_rows * hr_cols, dtype=torch.long)
    hr_digit = torch.full((hr_rows * hr_cols,), IGNORE_INDEX, dtype=torch.long)
    for tile in tiles:
        colour_class = COLOUR_NAMES.index(tile.colour) + 1
        lr_colour[tile.row // zoom_h * lr_cols + tile.col // zoom_w] = colour_class
        hr_colour[tile.row * hr_cols + tile.col] = colour_class
        hr_digit[tile.row * hr_cols + tile.col] = tile.digit
    query_cell = torch.tensor(query.row // zoom_h * lr_cols + query.col // zoom_w)
    return {"aux_lr_colour": lr_colour, "aux_hr_colour": hr_colour, "aux_hr_digit": hr_digit,
            "aux_query_cell": query_cell}


class SyntheticVQA(torch.utils.data.Dataset):
    """`num_samples` procedurally generated samples; sample i depends only on (seed, split, i).

    ``image_size`` and ``zoom`` may be (height, width): a non-square scene, for an architecture whose
    preprocessing takes any aspect ratio; its ``processor`` (the model's, ``flexvlm.data.visuals``)
    then turns the image into what the model takes. The default, for a square scene, is LLaVA-1.5's
    (pad, resize to ``image_size``, normalise with ``mean`` and ``std``)."""

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
        _check_geometry(image_size, patch_size, zoom)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.patch_size, self.zoom = image_size, patch_size, zoom
        self.num_tiles, self.fine_print, self.mean, self.std = tuple(num_tiles), fine_print, mean, std
        self.processor = processor  # the datamodule sets the model's once it knows the model

    def _image_entries(self, image: Image.Image) -> dict:
        if self.processor is not None:
            return self.processor.process(image)
        height, width = _pair(self.image_size)
        if height != width:
            raise ValueError(f"a {height} x {width} scene needs the model's image processor: LLaVA-1.5's "
                             f"preprocessing takes square scenes (image_size a single side)")
        return SquareImages(height, self.mean, self.std).process(image)

    def __len__(self) -> int:
        return self.num_samples

    def sample_ids(self) -> list[str]:
        return [self._sample_id(i) for i in range(self.num_samples)]

    def _sample_id(self, index: int) -> str:
        return f"synthetic-{self.split}-{self.seed}-{index}"

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
            **aux_targets(scene.tiles, scene.query, self.image_size, self.patch_size, self.zoom),
        }
