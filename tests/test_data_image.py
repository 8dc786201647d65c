"""Image utilities against hand-computed boxes and LLaVA's own preprocessing (expand2square +
the PIL CLIP image processor of `transformers`)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from flexvlm.data.image import CLIP_MEAN, CLIP_STD, load_image, pad_to_square, preprocess_image


def llava_expand2square(pil_img: Image.Image, background_color: tuple) -> Image.Image:
    """Verbatim from LLaVA-1.5 (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (10, 8), 77).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 8)
    assert img.getpixel((0, 0)) == (77, 77, 77)


def test_load_image_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_load_image_corrupt_file_is_a_value_error_naming_the_path(tmp_path, damage):
    path = tmp_path / "broken.png"
    random_image(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)


def test_pad_to_square_wide_image():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    square, box = pad_to_square(img, (1, 2, 3))
    assert square.size == (4, 4)
    # (4 - 2) // 2 = 1 row of fill on top, content rows 1..2, fill row 3
    assert box == (0.25, 0.0, 0.75, 1.0)
    pixels = np.asarray(square)
    assert (pixels[[0, 3]] == (1, 2, 3)).all() and (pixels[1:3] == (255, 0, 0)).all()


def test_pad_to_square_tall_image_and_square_image():
    _, box = pad_to_square(Image.new("RGB", (3, 5)), (0, 0, 0))
    assert box == (0.0, 1 / 5, 1.0, 4 / 5)  # left = (5 - 3) // 2 = 1
    img = random_image(6, 6)
    square, box = pad_to_square(img, (0, 0, 0))
    assert box == (0.0, 0.0, 1.0, 1.0) and np.array_equal(np.asarray(square), np.asarray(img))


@pytest.mark.parametrize("size", [(80, 50), (37, 61), (64, 64)])
def test_preprocess_matches_llava_clip_pipeline(size):
    img = random_image(*size, seed=size[0])
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    reference = processor(images=llava_expand2square(img, fill), return_tensors="pt")["pixel_values"][0]
    tensor, box = preprocess_image(img, 48, CLIP_MEAN, CLIP_STD)
    assert tensor.shape == (3, 48, 48)
    torch.testing.assert_close(tensor, reference, atol=1e-5, rtol=0)
    _, expected_box = pad_to_square(img, fill)
    assert torch.equal(box, torch.tensor(expected_box))


def test_preprocess_padding_is_zero_after_normalisation():
    # the fill is the mean colour, so the border normalises to ~0 (up to int() rounding)
    tensor, box = preprocess_image(Image.new("RGB", (40, 20), (255, 255, 255)), 40, CLIP_MEAN, CLIP_STD)
    assert box.tolist() == [0.25, 0.0, 0.75, 1.0]
    assert tensor[:, 0].abs().max() < 0.02 and tensor[:, -1].abs().max() < 0.02
    assert tensor[:, 15:25].min() > 1.5  # white content
