"""LLaVA-OneVision's image preprocessing and token geometry, equal to transformers' (the torchvision
LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, the model's pack_image_features) without it.

An image becomes 1 + rows x cols views of S x S pixels: the base view (the whole image squashed to
S x S), then, row-major, the tiles of a canvas: the image resized into the best-fit pinpoint
resolution with its aspect ratio kept, centred, the rest black. Each view gives g x g tower tokens.
The model packs an image's tokens as the base view's g * g tokens first, then the tiles' tokens
stitched into one (rows g) x (cols g) grid, less the rows (or columns) that cover the padding
("unpadded"), shrunk bilinearly when over the anyres_max_N budget: h rows of w tokens, each row
followed by one image_newline token, g * g + h * (w + 1) tokens in all. For FlexAttention the base
view is the low-res view in the sequence; the h x w grid tokens are the high-res tokens.
Sizes are (height, width) throughout, as transformers' image_sizes and pinpoints are.
"""

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import Tokenizer

Size = tuple[int, int]  # (height, width)

LOW_RES_MODES = ("lr_only", "xattn", "flex")  # FlexVLM's modes whose sequence holds the base view alone

# PIL resampling codes, as saved, -> torchvision modes (transformers' mapping); the checkpoint's is 3
RESAMPLE = {2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
IMAGE_PROCESSORS = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorFast")  # 5.x, 4.x torchvision


@dataclass(frozen=True)
class OneVisionProcessing:
    """What the preprocessing needs of a LLaVA-OneVision processor (and model)."""

    tile_size: int  # S: every view is S x S pixels
    patch_size: int  # the tower's patch in pixels: a view gives g = S // patch_size tokens a side
    pinpoints: tuple[Size, ...]  # the canvases an image may be fitted into, multiples of S
    max_views: int  # N of anyres_max_N: a grid of over 1.1^2 N views' tokens is shrunk to about N's
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    resample: int = 3  # a key of RESAMPLE
    image_token_id: int | None = None  # `<image>` in the tokenizer, what the prompt expands to

    def __post_init__(self) -> None:
        # transformers would cut a ragged last tile and stretch it, which the model's count ignores
        ragged = [p for p in self.pinpoints if p[0] % self.tile_size or p[1] % self.tile_size]
        if ragged:
            raise ValueError(f"pinpoints {ragged} are not multiples of the tile size {self.tile_size}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample {self.resample}: flexvlm implements {sorted(RESAMPLE)} (bilinear, bicubic)")

    @property
    def view_tokens(self) -> int:
        return self.tile_size // self.patch_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> "OneVisionProcessing":
        """The settings of a saved processor folder: transformers 5's processor_config.json (the image
        processor's settings under "image_processor") or the hub's pair preprocessor_config.json +
        processor_config.json. config.json, if there, gives the patch size and must agree;
        tokenizer.json, if there, gives the `<image>` id (else config.json's image_token_index)."""
        folder = Path(folder)
        processor = _read_json(folder / "processor_config.json")
        image = processor.get("image_processor") or _read_json(folder / "preprocessor_config.json")
        model = _read_json(folder / "config.json")
        if not image:
            raise FileNotFoundError(f"{folder}: no image processor settings (processor_config.json with "
                                    "'image_processor', or preprocessor_config.json)")
        foreign = [f"{name} {found!r}" for name, found, ours in (
            ("image_processor_type", image.get("image_processor_type"), IMAGE_PROCESSORS),
            ("processor_class", processor.get("processor_class", "LlavaOnevisionProcessor"),
             ("LlavaOnevisionProcessor",)),
            ("config.json model_type", model.get("model_type", "llava_onevision"), ("llava_onevision",)),
        ) if found not in ours]
        if foreign:
            raise ValueError(f"{folder} is not a LLaVA-OneVision processor: " + ", ".join(foreign))

        size = image.get("size") or {}
        tile = size.get("shortest_edge") or size.get("height")
        aspect = processor.get("vision_aspect_ratio", "anyres_max_9")  # the processor's default
        budget = re.fullmatch(r"anyres_max_(\d+)", aspect)
        num_tokens = processor.get("num_image_tokens")
        vision = model.get("vision_config", {})
        patch = vision.get("patch_size") or (tile // math.isqrt(num_tokens) if tile and num_tokens else None)
        missing = [key for key in ("image_grid_pinpoints", "image_mean", "image_std") if key not in image]
        problems = [text for bad, text in (
            (missing, f"no {', '.join(missing)} in the image processor's settings"),
            (tile is None or size.get("width", tile) != tile, f"size {size}: flexvlm implements square views"),
            (image.get("do_center_crop") or image.get("crop_size"), "a center crop (transformers' are uncropped)"),
            (not (image.get("do_rescale", True) and image.get("do_normalize", True)), "no rescale or normalisation"),
            (budget is None, f"vision_aspect_ratio {aspect!r}, not anyres_max_N"),
            # "default" drops a CLS token SigLIP does not have: the processor then counts one token
            # fewer an image, the model one fewer a view
            (processor.get("vision_feature_select_strategy") not in (None, "full"),
             f"vision_feature_select_strategy {processor.get('vision_feature_select_strategy')!r}, not 'full'"),
            (patch is None, "no num_image_tokens in processor_config.json and no config.json to read the patch from"),
            (patch and num_tokens is not None and num_tokens != (tile // patch) ** 2,
             f"num_image_tokens {num_tokens} is not ({tile} // patch {patch})^2"),
            # the model packs by its own config; a processor that disagrees counts other tokens
            (model and vision.get("image_size") != tile,
             f"config.json image_size {vision.get('image_size')} != size {tile}"),
            (model and model.get("image_grid_pinpoints") != image.get("image_grid_pinpoints"),
             "config.json image_grid_pinpoints differ from the image processor's"),
            (model and model.get("vision_aspect_ratio", "anyres_max_9") != aspect,
             f"config.json vision_aspect_ratio {model.get('vision_aspect_ratio')!r} != {aspect!r}"),
        ) if bad]
        if problems:
            raise ValueError(f"{folder}: unsupported or inconsistent settings:\n  " + "\n  ".join(problems))
        return cls(
            tile_size=tile, patch_size=patch, max_views=int(budget.group(1)),
            pinpoints=tuple(tuple(p) for p in image["image_grid_pinpoints"]),
            image_mean=tuple(image["image_mean"]), image_std=tuple(image["image_std"]),
            rescale_factor=image.get("rescale_factor", 1 / 255), resample=image.get("resample", 3),
            image_token_id=_image_token_id(folder, processor.get("image_token", "<image>"), model),
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _image_token_id(folder: Path, token: str, model: dict) -> int | None:
    added = _read_json(folder / "tokenizer.json").get("added_tokens", [])
    return next((t["id"] for t in added if t["content"] == token), model.get("image_token_index"))


@dataclass(frozen=True)
class OneVisionLayout:
    """Where one image's views and tokens go."""

    image_size: Size  # the original image
    best_resolution: Size  # the pinpoint canvas chosen for it
    fitted_size: Size  # the image inside the canvas (aspect kept, centred; the rest is black)
    grid: Size  # (rows, cols) of tiles: best_resolution // tile_size
    view_tokens: int  # g: each view gives g x g tokens
    tile_size: int  # S
    patch_size: int  # the tower's patch, pixels
    unpadded_grid: Size  # (h0, w0): the grid's tokens left after cutting those over the padding
    unpad_offset: Size  # tokens cut at the top, at the left (as many at the bottom, at the right)
    feature_grid: Size  # (h, w): after the anyres_max shrink; unpadded_grid when there is none

    @property
    def num_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def num_base_tokens(self) -> int:
        return self.view_tokens ** 2

    @property
    def num_tokens(self) -> int:
        """The image's packed features: the `<image>` tokens transformers' processor puts in the prompt."""
        h, w = self.feature_grid
        return self.num_base_tokens + h * (w + 1)

    def tokens_in_sequence(self, mode: str = "hd") -> int:
        """The image's tokens in a FlexVLM prompt of ``mode``: ``hd`` all of them (``num_tokens``, as
        transformers' processor); ``lr_only``, ``xattn``, ``flex`` the base view's g * g and one
        image_newline (the grid's tokens are high-res tokens beside the sequence, or absent)."""
        if mode == "hd":
            return self.num_tokens
        if mode in LOW_RES_MODES:
            return self.num_base_tokens + 1
        raise ValueError(f"unknown mode {mode!r}; valid: hd, {', '.join(LOW_RES_MODES)}")


def best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint showing most of the image's pixels once it is fitted in, then wasting least; the
    first of equals."""
    height, width = image_size
    best, best_key = None, None
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        key = (shown, shown - pin_w * pin_h)  # more shown, then less wasted
        if best_key is None or key > best_key:
            best, best_key = (pin_h, pin_w), key
    return best


def fitted_size(image_size: Size, canvas: Size) -> Size:
    """The image resized into the canvas with its aspect ratio kept (the binding side fills it)."""
    (height, width), (canvas_h, canvas_w) = image_size, canvas
    if canvas_w / width < canvas_h / height:
        return min(math.ceil(height * (canvas_w / width)), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * (canvas_h / height)), canvas_w)


def image_layout(image_size: Size, settings: OneVisionProcessing) -> OneVisionLayout:
    """The layout of an image of this (height, width), as the processor and the model compute it."""
    height, width = image_size
    canvas = best_resolution(image_size, settings.pinpoints)
    g, tile = settings.view_tokens, settings.tile_size
    grid = (canvas[0] // tile, canvas[1] // tile)
    grid_h, grid_w = grid[0] * g, grid[1] * g
    # the model cuts as many token rows (columns) at each side as the padding covers, the image's
    # extent in tokens rounded to 7 decimals first (so that 2.9999999 counts as 3)
    if width / height > grid_w / grid_h:  # wider than the grid: black rows above and below it
        top, left = (grid_h - int(round(height * (grid_w / width), 7))) // 2, 0
    else:
        top, left = 0, (grid_w - int(round(width * (grid_h / height), 7))) // 2
    kept_h, kept_w = grid_h - 2 * top, grid_w - 2 * left
    ratio = math.sqrt(kept_h * kept_w / (settings.max_views * g ** 2))
    feature_grid = (int(kept_h // ratio), int(kept_w // ratio)) if ratio > 1.1 else (kept_h, kept_w)
    return OneVisionLayout(
        image_size=(height, width), best_resolution=canvas, fitted_size=fitted_size(image_size, canvas),
        grid=grid, view_tokens=g, tile_size=tile, patch_size=settings.patch_size,
        unpadded_grid=(kept_h, kept_w), unpad_offset=(top, left), feature_grid=feature_grid,
    )


def _uint8_chw(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB" or "transparency" in image.info:
            # transformers composites transparency on white, flexvlm's to_rgb drops it: the caller's choice
            raise ValueError(f"expected an opaque RGB image, got mode {image.mode!r}: convert it first")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image.contiguous()
    raise TypeError(f"expected a PIL RGB image or a uint8 (3, H, W) tensor, got {type(image).__name__}"
                    + (f" {image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))


def preprocess_image(image: Image.Image | torch.Tensor, settings: OneVisionProcessing
                     ) -> tuple[torch.Tensor, OneVisionLayout]:
    """An image (PIL RGB, or uint8 (3, H, W)) -> its views (1 + rows * cols, 3, S, S), normalised:
    the base view, then the tiles row-major; and its layout."""
    pixels = _uint8_chw(image)
    layout = image_layout(tuple(pixels.shape[-2:]), settings)
    mode, tile = RESAMPLE[settings.resample], settings.tile_size
    (canvas_h, canvas_w), (fit_h, fit_w) = layout.best_resolution, layout.fitted_size
    fitted = TF.resize(pixels, [fit_h, fit_w], interpolation=mode, antialias=True)
    top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    canvas = TF.pad(fitted, [left, top, canvas_w - fit_w - left, canvas_h - fit_h - top])  # black, in uint8
    rows, cols = layout.grid
    tiles = canvas.unflatten(1, (rows, tile)).unflatten(3, (cols, tile)).permute(1, 3, 0, 2, 4).flatten(0, 1)
    base = TF.resize(pixels, [tile, tile], interpolation=mode, antialias=True)
    views = torch.cat([base[None], tiles]).float()
    # transformers folds the rescale into the mean and std, (x - mean / r) / (std / r): the same
    # float operations, so the values are bit-identical
    mean = (torch.tensor(settings.image_mean) * (1.0 / settings.rescale_factor))[:, None, None]
    std = (torch.tensor(settings.image_std) * (1.0 / settings.rescale_factor))[:, None, None]
    return (views - mean) / std, layout


def _axis_centres(n_out: int, n_kept: int, cut: int, pasted_at: int, fitted: int, original: int,
                  layout: OneVisionLayout) -> np.ndarray:
    """Along one axis: where each grid token's centre lies in the original image, in pixels."""
    g, tile, patch = layout.view_tokens, layout.tile_size, layout.patch_size
    token = np.arange(n_kept) + cut  # the kept tokens' indices in the canvas's token grid
    # a tile's token k sees pixels [k p, (k + 1) p) of it; the tile's last S - g p pixels feed none
    on_canvas = token // g * tile + (token % g + 0.5) * patch
    # a shrunk grid's token n is the kept tokens, linearly interpolated at (n + 0.5) n_kept / n_out
    # - 0.5 (bilinear, align_corners=False, clamped at the ends); unshrunk, at n itself
    sampled = np.interp((np.arange(n_out) + 0.5) * n_kept / n_out - 0.5, np.arange(n_kept), on_canvas)
    return (sampled - pasted_at) * original / fitted


def grid_token_centres(layout: OneVisionLayout) -> tuple[np.ndarray, np.ndarray]:
    """The centres of the h x w grid tokens in the original image, in pixels from its top-left
    corner: (ys of the h rows, xs of the w columns); the grid is separable."""
    (canvas_h, canvas_w), (fit_h, fit_w) = layout.best_resolution, layout.fitted_size
    (height, width), (h, w) = layout.image_size, layout.feature_grid
    (kept_h, kept_w), (top, left) = layout.unpadded_grid, layout.unpad_offset
    return (_axis_centres(h, kept_h, top, (canvas_h - fit_h) // 2, fit_h, height, layout),
            _axis_centres(w, kept_w, left, (canvas_w - fit_w) // 2, fit_w, width, layout))


def base_cell_of_grid_tokens(layout: OneVisionLayout) -> torch.Tensor:
    """(h, w) int64: for each grid (high-res) token, the flat index i * g + j of the base-view
    (low-res) cell that covers its centre. A low-res cell's high-res tokens: where the map equals it;
    a low-res mask (g * g,) becomes the high-res one as mask[map]."""
    g, tile, patch = layout.view_tokens, layout.tile_size, layout.patch_size
    ys, xs = grid_token_centres(layout)

    def cell(coord: np.ndarray, side: int) -> np.ndarray:
        # the base view is the image squashed to S x S; its cell i sees base pixels [i p, (i + 1) p)
        return np.clip(np.floor(coord * tile / side / patch), 0, g - 1).astype(np.int64)

    return torch.from_numpy(cell(ys, layout.image_size[0])[:, None] * g + cell(xs, layout.image_size[1])[None, :])


def expand_image_tokens(ids: Sequence[int], num_tokens: Sequence[int], image_token_id: int,
                        placeholder: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """ids with the k-th placeholder replaced by num_tokens[k] copies of image_token_id. transformers
    repeats `<image>` in the text and then tokenizes; a tokenizer splits its added tokens out before
    anything else, so the two agree when `<image>` is one (it is in the checkpoint's tokenizer)."""
    found = sum(i == placeholder for i in ids)
    if found != len(num_tokens):
        raise ValueError(f"{found} image placeholders in the ids, {len(num_tokens)} token counts")
    counts = iter(num_tokens)
    return [t for i in ids for t in ([image_token_id] * next(counts) if i == placeholder else [i])]


@dataclass(frozen=True)
class OneVisionBatch:
    """What transformers' processor returns with padding=True, plus each image's layout."""

    input_ids: torch.Tensor  # (B, L) int64, padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # (B, L) int64, 0 at the padding
    pixel_values: torch.Tensor  # (B, most views, 3, S, S), zeros after an image's own views
    image_sizes: torch.Tensor  # (B, 2) int64, (height, width)
    layouts: list[OneVisionLayout]


def batch_inputs(images: Sequence[Image.Image | torch.Tensor], prompts: Sequence[str], tokenizer: Tokenizer,
                 settings: OneVisionProcessing, padding_side: str = "right", mode: str = "hd") -> OneVisionBatch:
    """(image, prompt) pairs, one `<image>` in each prompt, -> a batch as transformers' processor
    makes it (``mode`` ``hd``; the other modes of FlexVLM hold fewer image tokens, see
    ``OneVisionLayout.tokens_in_sequence``). The tokenizer is flexvlm's (`<image>` ->
    IMAGE_TOKEN_INDEX, no special tokens added); the image tokens are ``settings.image_token_id``, as
    transformers' (``flexvlm_input_ids`` turns them into FlexVLM's placeholder)."""
    if len(images) != len(prompts) or padding_side not in ("left", "right"):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts, padding_side {padding_side!r}")
    if settings.image_token_id is None:
        raise ValueError("settings.image_token_id is unset: the prompt cannot name the image tokens")
    views, layouts, rows = zip(*(_sample(image, prompt, tokenizer, settings, mode)
                                 for image, prompt in zip(images, prompts)))
    length, most_views = max(map(len, rows)), max(v.shape[0] for v in views)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), None) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span], attention_mask[b, span] = torch.tensor(row), 1
    pixel_values = torch.zeros((len(views), most_views, *views[0].shape[1:]))
    for b, v in enumerate(views):
        pixel_values[b, : v.shape[0]] = v
    image_sizes = torch.tensor([layout.image_size for layout in layouts], dtype=torch.long)
    return OneVisionBatch(input_ids, attention_mask, pixel_values, image_sizes, list(layouts))


def _sample(image, prompt: str, tokenizer: Tokenizer, settings: OneVisionProcessing, mode: str):
    ids = tokenizer.encode(prompt)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        # several images in a prompt: transformers tiles them or not by how the images are nested; not here
        raise ValueError(f"a prompt needs exactly one <image>, found {ids.count(IMAGE_TOKEN_INDEX)}: {prompt!r}")
    views, layout = preprocess_image(image, settings)
    return views, layout, expand_image_tokens(ids, [layout.tokens_in_sequence(mode)], settings.image_token_id)
