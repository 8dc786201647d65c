"""SmolVLM / Idefics3 preprocessing without transformers, equal to transformers' processors (its torchvision
image processor, the one transformers 5 picks): an image becomes square tiles plus one global view, each `<image>`
of a prompt becomes that image's tokens, a batch is zero-padded to its largest number of views. For FlexAttention
the global view is the low-res image, the tiles the high-res one; `ImageLayout` says what each view shows.

transformers' views of an image (T = max_image_size.longest_edge, the vision tower's side):
1. the longest edge is resized to size.longest_edge (small images are upscaled), the other side by the aspect
   ratio, rounded down, then up to an even number;
2. with splitting on, each side is rounded up to a multiple of T (the short side first recomputed from the
   rounded long one), which stretches the image a little;
3. an image larger than T x T is cut into T x T tiles, row-major, followed by the whole image resized to T x T
   (the global view); a T x T image is its own only view. Splitting off: resized to T x T, the only view.
Every resize runs on uint8, antialiased (Lanczos by default, which torchvision has on the CPU only), then
(x - 255 mean) / (255 std) in float32.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tokenizers
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from flexvlm.data.image import Box

ImageLike = Image.Image | Tensor

# transformers' bound on a resized side (MAX_IMAGE_SIZE in its Idefics3 / SmolVLM image processors)
MAX_SIDE = 4096

# "resample" as configs save it (PIL's filter numbers) -> the torchvision mode transformers uses for it
RESAMPLE_MODES = dict(enumerate(InterpolationMode[name] for name in
                                 ("NEAREST_EXACT", "LANCZOS", "BILINEAR", "BICUBIC", "BOX", "HAMMING")))

PROCESSOR_FAMILIES = {"SmolVLMProcessor": "smolvlm", "Idefics3Processor": "idefics3"}


@dataclass(frozen=True)
class SmolVLMProcessing:
    """A SmolVLM / Idefics3 processor folder's preprocessing settings (transformers' defaults for absent keys)."""

    family: str  # "smolvlm" or "idefics3"
    tile_size: int  # max_image_size.longest_edge: the side of every view, the vision tower's input
    longest_edge: int  # size.longest_edge: the image's longest edge before it is split
    do_image_splitting: bool
    resample: InterpolationMode
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    image_seq_len: int  # image tokens per view
    image_token: str = "<image>"
    fake_image_token: str = "<fake_token_around_image>"
    global_image_token: str = "<global-img>"

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SmolVLMProcessing":
        """Settings of a folder saved by SmolVLMProcessor / Idefics3Processor.save_pretrained."""
        folder = Path(folder)
        processor = _read_json(folder / "processor_config.json")
        # transformers 5 saves the image processor inside processor_config.json, 4.x beside it
        image = _read_json(folder / "preprocessor_config.json") or processor.get("image_processor", {})
        # 4.x folders name the processor class in both files, 5's in processor_config.json
        processor_class = processor.get("processor_class") or image.get("processor_class")
        family = PROCESSOR_FAMILIES.get(processor_class)
        if family is None:
            raise ValueError(f"{folder} is not a SmolVLM / Idefics3 processor folder: processor_class "
                             f"{processor_class!r}, image_processor_type {image.get('image_processor_type')!r}")
        steps = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
        switched_off = [k for k in steps if not image.get(k, True)]
        if switched_off:
            raise ValueError(f"{folder}: {', '.join(switched_off)} false is not supported (only the defaults, true)")
        size, tile = image.get("size", {"longest_edge": 4 * 364}), image.get("max_image_size", {"longest_edge": 364})
        if "longest_edge" not in size or "longest_edge" not in tile:
            raise ValueError(f"{folder}: size and max_image_size must give longest_edge, got {size} and {tile}")
        if image.get("resample", 1) not in RESAMPLE_MODES:
            raise ValueError(f"{folder}: unknown resample {image['resample']!r}, expected 0 to 5 (PIL's filters)")
        # SmolVLMProcessor spells its tokens as the tokenizer names them; Idefics3Processor's are fixed
        spellings = _tokenizer_token_spellings(folder) if family == "smolvlm" else {}
        return cls(
            family=family,
            tile_size=tile["longest_edge"],
            longest_edge=size["longest_edge"],
            do_image_splitting=image.get("do_image_splitting", True),
            resample=RESAMPLE_MODES[image.get("resample", 1)],
            image_mean=tuple(image.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(image.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=image.get("rescale_factor", 1 / 255),
            image_seq_len=processor.get("image_seq_len", 169),
            **spellings,
        )


@dataclass(frozen=True)
class ImageLayout:
    """Where an image's views come from. The image, resized to `resized_size`, is cut into rows x cols tiles of
    tile_size x tile_size, row-major (view r * cols + c); the global view, the whole image squeezed to
    tile_size x tile_size, comes last. rows = cols = 0: not split, the global view is the only view."""

    rows: int
    cols: int
    tile_size: int
    original_size: tuple[int, int]  # (height, width) of the input image
    resized_size: tuple[int, int]  # (height, width) the tiles cut; (tile_size, tile_size) when not split

    @property
    def num_views(self) -> int:
        return self.rows * self.cols + 1

    @property
    def global_view(self) -> int:
        """Index of the global (low-res) view among the image's views: the last."""
        return self.rows * self.cols

    def view_box(self, view: int) -> Box:
        """(top, left, bottom, right) of the part of the image that view `view` shows, as fractions of its height
        and width (each resize maps the whole image onto the whole output, so fractions of the resized image are
        fractions of the original)."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"view {view} out of range for {self.num_views} views")
        if view == self.global_view:
            return (0.0, 0.0, 1.0, 1.0)
        row, col = divmod(view, self.cols)
        return (row / self.rows, col / self.cols, (row + 1) / self.rows, (col + 1) / self.cols)


@dataclass(frozen=True)
class SplitImage:
    pixel_values: Tensor  # (num_views, 3, tile, tile) float32, normalised: the tiles row-major, then the global view
    layout: ImageLayout


@dataclass(frozen=True)
class ImageBatch:
    pixel_values: Tensor  # (B, most views, 3, tile, tile) float32; a sample's missing views are all zero
    pixel_attention_mask: Tensor  # (B, most views, tile, tile) int64: 1 on a real view, 0 on padding
    layouts: list[list[ImageLayout]]  # per sample, per image

    def to(self, *args, **kwargs) -> "ImageBatch":
        """The tensors moved as ``Tensor.to`` moves them (how Lightning moves a batch to its device)."""
        return replace(self, pixel_values=self.pixel_values.to(*args, **kwargs),
                       pixel_attention_mask=self.pixel_attention_mask.to(*args, **kwargs))


def split_image(image: ImageLike, processing: SmolVLMProcessing) -> SplitImage:
    """An image (PIL, or a (3, H, W) uint8 tensor) as its normalised views and their layout."""
    pixels = rgb_uint8(image)
    original_size = (pixels.shape[-2], pixels.shape[-1])
    tile = processing.tile_size
    pixels = _resize(pixels, _fit_longest_edge(*original_size, processing.longest_edge), processing)
    rows = cols = 0
    if not processing.do_image_splitting:
        views = _resize(pixels, (tile, tile), processing)[None]
    else:
        pixels = _resize(pixels, _round_up_to_tiles(pixels.shape[-2], pixels.shape[-1], tile), processing)
        if pixels.shape[-2:] == (tile, tile):
            views = pixels[None]
        else:
            rows, cols = pixels.shape[-2] // tile, pixels.shape[-1] // tile
            tiles = pixels.unflatten(1, (rows, tile)).unflatten(3, (cols, tile))  # (3, rows, T, cols, T)
            tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
            views = torch.cat([tiles, _resize(pixels, (tile, tile), processing)[None]])
    resized_size = (rows * tile, cols * tile) if rows else (tile, tile)
    return SplitImage(normalize_pixels(views, processing), ImageLayout(rows, cols, tile, original_size, resized_size))


def batch_images(samples: Sequence[ImageLike | Sequence[ImageLike]], processing: SmolVLMProcessing) -> ImageBatch:
    """Each sample's images (one image or a list, maybe empty), their views concatenated in order, zero-padded
    to the batch's largest number of views, as transformers' processor batches them."""
    return collate([[split_image(im, processing) for im in (s if isinstance(s, (list, tuple)) else [s])]
                    for s in samples])


def collate(splits: Sequence[Sequence[SplitImage]]) -> ImageBatch:
    """Each sample's split images (maybe none), their views concatenated in order, zero-padded to the batch's
    largest number of views (``batch_images``, for images split already, maybe with different settings)."""
    num_views = [sum(split.layout.num_views for split in sample) for sample in splits]
    if not num_views or max(num_views) == 0:
        raise ValueError("batch_images: the batch holds no image")
    tiles = {split.layout.tile_size for sample in splits for split in sample}
    if len(tiles) != 1:
        raise ValueError(f"the views of one batch must share one tile size, got {sorted(tiles)}")
    (tile,) = tiles
    pixel_values = torch.zeros(len(splits), max(num_views), 3, tile, tile)
    pixel_attention_mask = torch.zeros(len(splits), max(num_views), tile, tile, dtype=torch.int64)
    for i, sample in enumerate(splits):
        if sample:
            pixel_values[i, : num_views[i]] = torch.cat([split.pixel_values for split in sample])
        pixel_attention_mask[i, : num_views[i]] = 1
    return ImageBatch(pixel_values, pixel_attention_mask, [[split.layout for split in sample] for sample in splits])


def image_prompt(layout: ImageLayout, processing: SmolVLMProcessing, global_only: bool = False) -> str:
    """The text one `<image>` becomes (the same for SmolVLM and Idefics3): per tile, the fake token,
    `<row_r_col_c>` (1-based) and image_seq_len image tokens, a newline after each row of tiles; then, after one
    more newline when split, the global view's tokens between two fake tokens. ``global_only``: the global view's
    part alone, what transformers makes of an image that is its own only view (the prompt of FlexVLM's modes other
    than ``hd``, whose sequence holds the global view only)."""
    p = processing
    image_tokens = p.image_token * p.image_seq_len
    global_view = f"{p.fake_image_token}{p.global_image_token}{image_tokens}{p.fake_image_token}"
    if layout.rows == 0 or global_only:
        return global_view
    tile_rows = (
        "".join(f"{p.fake_image_token}<row_{r + 1}_col_{c + 1}>{image_tokens}" for c in range(layout.cols)) + "\n"
        for r in range(layout.rows)
    )
    return "".join(tile_rows) + "\n" + global_view


def expand_prompt(text: str, layouts: Sequence[ImageLayout], processing: SmolVLMProcessing,
                  global_only: bool = False) -> str:
    """`text` with its k-th `<image>` replaced by the k-th image's tokens (``global_only``: see ``image_prompt``)."""
    pieces = text.split(processing.image_token)
    if len(pieces) - 1 != len(layouts):
        raise ValueError(f"the text holds {len(pieces) - 1} {processing.image_token} but {len(layouts)} images")
    expanded = [pieces[0]]
    for layout, piece in zip(layouts, pieces[1:]):
        expanded += [image_prompt(layout, processing, global_only), piece]
    return "".join(expanded)


def prompt_ids(
    text: str, layouts: Sequence[ImageLayout], processing: SmolVLMProcessing, tokenizer: tokenizers.Tokenizer,
    global_only: bool = False,
) -> list[int]:
    """Token ids of the expanded prompt, with the special tokens the tokenizer adds itself (Idefics3's Llama 3
    tokenizer a BOS, SmolVLM's none), as transformers' processor encodes it. ``global_only``: the prompt of
    FlexVLM's modes other than ``hd`` (``image_prompt``)."""
    return tokenizer.encode(expand_prompt(text, layouts, processing, global_only)).ids


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer_token_spellings(folder: Path) -> dict[str, str]:
    """The tokenizer's named tokens, at the top level of tokenizer_config.json (where transformers 5 saves them);
    absent ones keep the defaults, as in SmolVLMProcessor."""
    config = _read_json(folder / "tokenizer_config.json")
    names = ("image_token", "fake_image_token", "global_image_token")
    # each a string, or an AddedToken saved as a dict
    return {name: v["content"] if isinstance(v, dict) else v for name in names if (v := config.get(name))}


def rgb_uint8(image: ImageLike) -> Tensor:
    """(3, H, W) uint8 on the CPU. PIL transparency is composited onto white, as transformers does."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if isinstance(image, Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image.cpu().contiguous()
    what = f" {tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else ""
    raise TypeError(f"expected a PIL image or a (3, H, W) uint8 tensor, got {type(image).__name__}{what}")


def _resize(pixels: Tensor, size: tuple[int, int], processing: SmolVLMProcessing) -> Tensor:
    return TF.resize(pixels, list(size), interpolation=processing.resample, antialias=True)


def _fit_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1: the longest edge to longest_edge, the other side by the aspect ratio and up to even, then both
    under MAX_SIDE. The float expressions are transformers' own: int() of a quotient computed otherwise can differ
    by a pixel."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _round_up_to_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2: the long side up to a multiple of the tile; the short side recomputed from it by the aspect ratio,
    then up to a multiple too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def normalize_pixels(views: Tensor, processing: SmolVLMProcessing) -> Tensor:
    # transformers folds the rescale into mean and std (in float32); the same arithmetic keeps every bit
    mean = torch.tensor(processing.image_mean, dtype=torch.float32) * (1.0 / processing.rescale_factor)
    std = torch.tensor(processing.image_std, dtype=torch.float32) * (1.0 / processing.rescale_factor)
    return views.float().sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))
