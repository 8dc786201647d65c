"""Image utilities against hand-computed boxes, pixel values and rotations, and LLaVA's own
preprocessing (expand2square + the PIL CLIP image processor of `transformers`)."""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from flexvlm.data.image import CLIP_MEAN, CLIP_STD, load_image, open_image, pad_to_square, preprocess_image


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


# --- sizes a file claims, 16-bit pixels, EXIF orientation ------------------------------------------


def write_png(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = 0,
              rows: np.ndarray | None = None) -> Path:
    """A PNG written byte by byte: its header claims ``width`` x ``height`` whatever ``rows`` holds (no
    rows: a few zero bytes, so that a huge size costs nothing on disk). Colour type 0 is grey, 2 RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"\0" * 16 if rows is None else b"".join(b"\0" + row.tobytes() for row in rows)  # filter 0 each row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "small.png"
    random_image(24, 16).save(path)
    assert open_image(path, max_pixels=24 * 16).size == (24, 16)
    with pytest.raises(ValueError, match=r"image too large .*small.png: 24 x 16 pixels, over the limit of 383 "
                                         r"\(data.init_args.max_image_pixels\)"):
        open_image(path, max_pixels=383)


def test_pillows_decompression_bomb_warning_and_error_are_bad_images_naming_the_file(tmp_path):
    # Pillow warns over PIL.Image.MAX_IMAGE_PIXELS (89,478,485 by default) and raises over twice that
    over_the_default = write_png(tmp_path / "warns.png", 10000, 9000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning must not escape (nor become a crash)
        with pytest.raises(ValueError, match=r"warns.png: 10000 x 9000 pixels, over the limit of 89478485"):
            load_image(over_the_default)
    with pytest.raises(ValueError, match=r"image too large .*bomb.png: Image size \(200000000 pixels\) exceeds"):
        load_image(write_png(tmp_path / "bomb.png", 20000, 10000))


# Values whose 8-bit form tells the conventions apart: v >> 8 (Pillow's own for 16-bit RGB) and
# round(v / 257) differ on 0x01ff (1 / 2) and 0xff00 (255 / 254); flexvlm keeps the high byte, v >> 8.
WIDE = np.array([0x0000, 0x00FF, 0x0100, 0x01FF, 0x1234, 0x8000, 0xFF00, 0xFFFF], dtype=np.uint16)
HIGH_BYTES = [0, 0, 1, 1, 0x12, 128, 255, 255]  # by hand


def test_16_bit_grey_png_keeps_its_high_byte_instead_of_turning_white(tmp_path):
    values = np.tile(WIDE, (8, 1))  # 8 x 8, each row the values above
    path = write_png(tmp_path / "grey16.png", 8, 8, bit_depth=16, rows=values.astype(">u2"))
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 8, 3) and (pixels == np.array(HIGH_BYTES)[None, :, None]).all()


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I", "=i4")])
def test_every_16_bit_grey_mode_converts_like_the_file(mode, dtype):
    img = Image.frombytes(mode, (8, 8), np.tile(WIDE, (8, 1)).astype(dtype).tobytes())  # its own byte layout
    tensor, _ = preprocess_image(img, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (tensor * 255).round().to(torch.uint8)[0, 0].tolist() == HIGH_BYTES


def test_16_bit_rgb_png_reads_as_its_high_bytes(tmp_path):
    rgb = np.stack([WIDE, WIDE[::-1], np.roll(WIDE, 3)], axis=-1)  # one row of 8 pixels, each channel other values
    rows = np.tile(rgb, (8, 1, 1)).astype(">u2")
    path = write_png(tmp_path / "rgb16.png", 8, 8, bit_depth=16, colour_type=2, rows=rows)
    pixels = np.asarray(load_image(path))[0]
    assert pixels[:, 0].tolist() == HIGH_BYTES and pixels[:, 1].tolist() == HIGH_BYTES[::-1]


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1)])  # 6: turn 90 degrees clockwise to view; 8: anti-
def test_exif_orientation_is_applied(orientation, turns, tmp_path):
    stored = np.asarray(random_image(12, 9))
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation  # the Orientation tag
    img.save(tmp_path / "turned.png", exif=exif)
    upright = np.asarray(load_image(tmp_path / "turned.png"))
    assert np.array_equal(upright, np.rot90(stored, k=turns))  # np.rot90: k=1 anticlockwise


def test_unreadable_exif_is_a_bad_image_naming_the_file(tmp_path):
    path = tmp_path / "exif.png"
    random_image(12, 9).save(path, exif=b"Exif\0\0not a tiff header")
    with pytest.raises(ValueError, match=r"cannot decode image .*exif.png"):
        load_image(path)
