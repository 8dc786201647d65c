"""Qwen2-VL / Qwen2.5-VL image preprocessing without transformers, equal to transformers' processors (the
torchvision ``Qwen2VLImageProcessor`` that both ``Qwen2VLProcessor`` and ``Qwen2_5_VLProcessor`` use, the one
transformers 5 picks by default) and the prompt's image tokens as those processors expand them.

An image is not tiled: it is resized as a whole (``smart_resize``) to sides that are multiples of
patch_size * merge_size (28 px by default) with its pixel count between min_pixels and max_pixels, keeping its
aspect ratio as well as those allow; rescaled and normalised; then cut into p x p patches. Each patch is repeated
temporal_patch_size times (a still image is a clip of identical frames, since the tower's patch embedding is a
3-D convolution over temporal_patch_size frames) and flattened in the order (channel, frame, row, column); the
patches are listed by merge blocks: the m x m patches that the tower's merger fuses into one token are
consecutive, the blocks row-major. An image of H x W px gives (t, h, w) = (1, H / p, W / p) patches
(``image_grid_thw``) and h * w / m^2 tokens in the decoder, row-major on the (h / m, w / m) grid of merge blocks.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import tokenizers
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from flexvlm.architectures.smolvlm.preprocess import RESAMPLE_MODES, ImageLike, normalize_pixels, rgb_uint8
from flexvlm.data.image import CLIP_MEAN, CLIP_STD

__all__ = [
    "Grid", "MAX_ASPECT_RATIO", "PackedImages", "QwenImage", "QwenImageBatch", "QwenVLProcessing", "batch_images",
    "batch_samples", "expand_prompt", "image_prompt", "num_image_tokens", "preprocess_image", "prompt_ids",
    "reduced_processing", "smart_resize",
]

Grid = tuple[int, int, int]  # (t, h, w): frames (of temporal patches), rows and columns of patches

# transformers' smart_resize refuses images whose long side is over 200 times the short one
MAX_ASPECT_RATIO = 200

IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")  # 5.x's torchvision class, 4.x's
PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


@dataclass(frozen=True)
class QwenVLProcessing:
    """A Qwen2-VL / Qwen2.5-VL processor's image settings; the defaults are transformers' (Qwen2VLImageProcessor's
    class defaults; the hub's checkpoints set max_pixels to 12845056 = 28 * 28 * 16384)."""

    min_pixels: int = 56 * 56  # size.shortest_edge: the fewest pixels of a resized image
    max_pixels: int = 28 * 28 * 1280  # size.longest_edge: the most
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2  # the tower's merger fuses merge_size x merge_size patches into one token
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: InterpolationMode = InterpolationMode.BICUBIC
    image_token: str = "<|image_pad|>"  # what the processor repeats once per image token
    # what the chat template writes around an image's pad token (the processor leaves them as they are)
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"

    def __post_init__(self) -> None:
        problems = [f"{name} {value!r}: expected a positive int" for name, value in (
            ("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels), ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size), ("merge_size", self.merge_size),
        ) if isinstance(value, bool) or not isinstance(value, int) or value <= 0]
        if not problems and self.min_pixels > self.max_pixels:
            problems.append(f"min_pixels {self.min_pixels} over max_pixels {self.max_pixels}")
        if problems:
            raise ValueError("Qwen2-VL image settings: " + "; ".join(problems))

    @property
    def factor(self) -> int:
        """What both resized sides are multiples of: one merge block, in pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> "QwenVLProcessing":
        """The settings of a processor folder: transformers 5's processor_config.json (the image processor's
        settings under "image_processor"), or the hub's preprocessor_config.json. As transformers reads them,
        min_pixels / max_pixels, where given, replace size's shortest_edge / longest_edge. The image token is the
        tokenizer's ``image_token`` where tokenizer_config.json names one (as Qwen2VLProcessor asks the tokenizer)."""
        folder = Path(folder)
        processor = _read_json(folder / "processor_config.json")
        image = processor.get("image_processor") or _read_json(folder / "preprocessor_config.json")
        if not image:
            raise FileNotFoundError(f"{folder}: no image processor settings (processor_config.json with "
                                    "'image_processor', or preprocessor_config.json)")
        processor_class = processor.get("processor_class") or image.get("processor_class")
        foreign = [f"{name} {found!r}" for name, found, ours in (
            ("image_processor_type", image.get("image_processor_type"), IMAGE_PROCESSORS),
            ("processor_class", processor_class, (*PROCESSORS, None)),  # None: an image processor saved alone
        ) if found not in ours]
        if foreign:
            raise ValueError(f"{folder} is not a Qwen2-VL / Qwen2.5-VL processor: " + ", ".join(foreign))
        steps = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
        switched_off = [k for k in steps if not image.get(k, True)]
        if switched_off:
            raise ValueError(f"{folder}: {', '.join(switched_off)} false is not supported (only the defaults, true)")
        if image.get("resample", 3) not in RESAMPLE_MODES:
            raise ValueError(f"{folder}: unknown resample {image['resample']!r}, expected 0 to 5 (PIL's filters)")
        size, defaults = image.get("size") or {}, cls()

        def pixels(key: str, size_key: str, default: int) -> int:
            return image[key] if image.get(key) is not None else size.get(size_key, default)

        spelled = _read_json(folder / "tokenizer_config.json").get("image_token")
        return cls(
            min_pixels=pixels("min_pixels", "shortest_edge", defaults.min_pixels),
            max_pixels=pixels("max_pixels", "longest_edge", defaults.max_pixels),
            patch_size=image.get("patch_size", defaults.patch_size),
            temporal_patch_size=image.get("temporal_patch_size", defaults.temporal_patch_size),
            merge_size=image.get("merge_size", defaults.merge_size),
            image_mean=tuple(image.get("image_mean", defaults.image_mean)),
            image_std=tuple(image.get("image_std", defaults.image_std)),
            rescale_factor=image.get("rescale_factor", defaults.rescale_factor),
            resample=RESAMPLE_MODES[image.get("resample", 3)],
            image_token=(spelled["content"] if isinstance(spelled, dict) else spelled) or defaults.image_token,
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) an image is resized to: each side rounded to the nearest multiple of ``factor`` (Python's
    round: a tie goes to the even multiple, 70 px -> 56 with factor 28); if that holds more than max_pixels, both
    sides scaled down by the same ratio and rounded down (at least one factor); if fewer than min_pixels, scaled
    up and rounded up. The float expressions are transformers' own: others can differ by one factor."""
    if min(height, width) <= 0:
        raise ValueError(f"image of {height} x {width} pixels: both sides must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height} x {width} pixels: an aspect ratio over {MAX_ASPECT_RATIO}, which "
                         f"Qwen2-VL's processor refuses")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(grid: Grid | Sequence[int] | Tensor, merge_size: int) -> int:
    """The decoder tokens of an image of ``grid`` patches: t * h * w / merge_size^2 (the processor's count)."""
    t, h, w = (int(v) for v in grid)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid (t, h, w) = {(t, h, w)}: h and w must be multiples of the merge size {merge_size}")
    return t * h * w // merge_size ** 2


@dataclass(frozen=True)
class QwenImage:
    """One preprocessed image."""

    pixel_values: Tensor  # (h * w, C * temporal_patch_size * p * p) float32, patches by merge blocks
    grid: Grid  # (1, h, w) patches
    original_size: tuple[int, int]  # (height, width) of the input image, which the (h p) x (w p) pixels show whole


def preprocess_image(image: ImageLike, processing: QwenVLProcessing) -> QwenImage:
    """An image (PIL, transparency composited onto white as transformers does, or a (3, H, W) uint8 tensor) as the
    tower takes it."""
    pixels = rgb_uint8(image)
    original_size = (pixels.shape[-2], pixels.shape[-1])
    p = processing
    resized = smart_resize(*original_size, p.factor, p.min_pixels, p.max_pixels)
    # antialiased, on uint8 (the result rounded to uint8), then one subtract-and-divide in float32 with the rescale
    # folded into mean and std: transformers' torchvision path, bit for bit
    pixels = normalize_pixels(TF.resize(pixels, list(resized), interpolation=p.resample, antialias=True), p)
    h, w = resized[0] // p.patch_size, resized[1] // p.patch_size
    m, c = p.merge_size, pixels.shape[0]
    patches = pixels.reshape(c, h // m, m, p.patch_size, w // m, m, p.patch_size)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p): merge blocks, then the patch
    frames = patches.unsqueeze(5).expand(*patches.shape[:5], p.temporal_patch_size, *patches.shape[5:])
    return QwenImage(frames.reshape(h * w, -1), (1, h, w), original_size)


def batch_images(images: Sequence[QwenImage]) -> tuple[Tensor, Tensor]:
    """Preprocessed images in order (a batch's, sample after sample) -> (pixel_values (sum of h * w, D), the
    concatenated patches as transformers' processor returns them; image_grid_thw (n, 3) int64)."""
    if not images:
        raise ValueError("batch_images: no image")
    return (torch.cat([image.pixel_values for image in images]),
            torch.tensor([image.grid for image in images], dtype=torch.long))


def reduced_processing(processing: QwenVLProcessing, zoom: int) -> QwenVLProcessing:
    """The settings of the reduced resolution, FlexVLM's low-res view: the pixel budget divided by zoom^2
    (max_pixels // zoom^2, never under min_pixels), everything else the processor's. An image over the reduced
    budget comes out about zoom times smaller a side than at the native budget; one under it is the same at both.
    Through these settings transformers' own processor gives the same pixels, so the reduced image is the original
    model's input at a smaller max_pixels."""
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be an int >= 1, got {zoom!r}")
    return replace(processing, max_pixels=max(processing.max_pixels // zoom ** 2, processing.min_pixels))


@dataclass(frozen=True)
class PackedImages:
    """A batch's images at one resolution as the tower takes them (``batch_images``)."""

    pixel_values: Tensor  # (sum of t * h * w, C * T * p * p), image after image, sample after sample
    grid_thw: Tensor  # (n, 3) int64


@dataclass(frozen=True)
class QwenImageBatch:
    """A batch's images at their native resolution (``hd``'s, the processor's settings) and at the reduced one
    (``reduced_processing``: the low-res view of ``lr_only``), and how many images each sample holds, in order."""

    native: PackedImages
    reduced: PackedImages
    images_per_sample: tuple[int, ...]

    def at(self, mode: str) -> PackedImages:
        """The images a mode puts in the sequence: ``hd`` the native ones, the others the reduced ones."""
        return self.native if mode == "hd" else self.reduced

    def grids(self, mode: str) -> list[list[Grid]]:
        """Each sample's image grids at the mode's resolution (what its prompt expands, ``prompt_ids``)."""
        flat = [tuple(g) for g in self.at(mode).grid_thw.tolist()]
        bounds = [0]
        for count in self.images_per_sample:
            bounds.append(bounds[-1] + count)
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def batch_samples(samples: Sequence[Sequence[ImageLike]], processing: QwenVLProcessing, zoom: int) -> QwenImageBatch:
    """Each sample's images (any number, in its prompt's order) preprocessed at both resolutions."""
    images = [image for sample in samples for image in sample]
    if not images:
        raise ValueError("batch_samples: the batch holds no image")
    reduced = reduced_processing(processing, zoom)
    native_pixels, native_grids = batch_images([preprocess_image(image, processing) for image in images])
    reduced_pixels, reduced_grids = batch_images([preprocess_image(image, reduced) for image in images])
    return QwenImageBatch(PackedImages(native_pixels, native_grids), PackedImages(reduced_pixels, reduced_grids),
                          tuple(len(sample) for sample in samples))


def image_prompt(grid: Grid, processing: QwenVLProcessing) -> str:
    """An image's part of the prompt as the chat template and the processor make it: the vision-start token, one
    pad token per image token, the vision-end token."""
    pads = processing.image_token * num_image_tokens(grid, processing.merge_size)
    return f"{processing.vision_start_token}{pads}{processing.vision_end_token}"


def expand_prompt(text: str, grids: Sequence[Grid], processing: QwenVLProcessing) -> str:
    """``text`` with its k-th pad token repeated once per token of the k-th image, as the processor expands it
    (the vision-start / -end tokens around it are the text's own)."""
    pieces = text.split(processing.image_token)
    if len(pieces) - 1 != len(grids):
        raise ValueError(f"the text holds {len(pieces) - 1} {processing.image_token} but {len(grids)} images")
    expanded = [pieces[0]]
    for grid, piece in zip(grids, pieces[1:]):
        expanded += [processing.image_token * num_image_tokens(grid, processing.merge_size), piece]
    return "".join(expanded)


def prompt_ids(text: str, grids: Sequence[Grid], processing: QwenVLProcessing, tokenizer: tokenizers.Tokenizer
               ) -> list[int]:
    """Token ids of the expanded prompt, as the processor encodes it (Qwen's tokenizer adds no special tokens)."""
    return tokenizer.encode(expand_prompt(text, grids, processing)).ids


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
