"""Qwen2-VL / Qwen2.5-VL preprocessing (flexvlm/architectures/qwen2_vl/preprocess.py) against transformers'
processors, saved offline with small pixel budgets and a tokenizer trained here, and sizes by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torchvision.transforms import InterpolationMode
from test_smolvlm_preprocess import _noise, _rng  # the same noise, the hardest content for a resampling filter

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from flexvlm.architectures.qwen2_vl.preprocess import (  # noqa: E402
    QwenVLProcessing,
    batch_images,
    expand_prompt,
    image_prompt,
    num_image_tokens,
    preprocess_image,
    prompt_ids,
    smart_resize,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"

# processor settings: (processor class, min_pixels, max_pixels, resample); 28 * 28 = 784 pixels a merged token
CONFIGS = {
    "qwen2-vl": (Qwen2VLProcessor, 784 * 4, 784 * 40, 3),
    "qwen2.5-vl": (Qwen2_5_VLProcessor, 784 * 4, 784 * 40, 3),
    "qwen2-vl-bilinear-wide-budget": (Qwen2VLProcessor, 784 * 8, 784 * 120, 2),
}

IMAGES = {
    "tiny-upscaled": _noise(12, 10),
    "square": _noise(96, 96),
    "wide-7:1": _noise(400, 60),
    "tall-1:6": _noise(50, 300),
    "above-max-pixels": _noise(450, 500),
    "multiples-of-28": _noise(84, 56),
    "rounding-ties": _noise(126, 70),  # 126 / 28 = 4.5 and 70 / 28 = 2.5: Python rounds both to the even multiple
    "rgba": _noise(70, 90, "RGBA"),
    "grey": _noise(120, 80, "L"),
    "uint8-tensor": torch.from_numpy(_rng.integers(0, 256, (3, 80, 150), dtype=np.uint8)),
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens (Qwen2's tokenizer adds no BOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user\nWhat is in the picture? Compare them.\nassistant\n"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module", params=list(CONFIGS))
def processors_pair(request, tmp_path_factory):
    """(flexvlm's settings, transformers' processor loaded back, the raw tokenizer) of one saved folder."""
    processor_class, min_pixels, max_pixels, resample = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    images = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, resample=resample)
    processor_class(images, _tokenizer(), Qwen2VLVideoProcessor()).save_pretrained(folder)
    reference = AutoProcessor.from_pretrained(folder)
    # the premise: transformers 5's default for these folders is the torchvision image processor, matched here
    assert type(reference) is processor_class
    assert type(AutoImageProcessor.from_pretrained(folder)) is Qwen2VLImageProcessor
    assert reference.image_processor.backend == "torchvision"
    processing = QwenVLProcessing.from_folder(folder)
    assert (processing.min_pixels, processing.max_pixels) == (min_pixels, max_pixels)
    return processing, reference, Tokenizer.from_file(str(folder / "tokenizer.json"))


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(IMAGES))
def test_pixels_grid_and_ids_equal_transformers(processors_pair, name):
    processing, reference, tokenizer = processors_pair
    expected = reference(images=[IMAGES[name]], text=[PROMPT], return_tensors="pt")
    image = preprocess_image(IMAGES[name], processing)

    _exact(image.pixel_values, expected["pixel_values"])
    assert [list(image.grid)] == expected["image_grid_thw"].tolist()
    ids = prompt_ids(PROMPT, [image.grid], processing, tokenizer)
    assert ids == expected["input_ids"][0].tolist()
    image_token_id = tokenizer.token_to_id(processing.image_token)
    assert [int(i == image_token_id) for i in ids] == expected["mm_token_type_ids"][0].tolist()
    assert ids.count(image_token_id) == num_image_tokens(image.grid, processing.merge_size)


def test_batch_equal_transformers(processors_pair):
    """Two samples, the first with two images of different sizes, padded on the right."""
    processing, reference, tokenizer = processors_pair
    samples = [[IMAGES["wide-7:1"], IMAGES["tiny-upscaled"]], [IMAGES["above-max-pixels"]]]
    texts = [f"Compare {IMAGE} with\n{IMAGE}.", PROMPT]
    expected = reference(images=[im for s in samples for im in s], text=texts, padding=True, return_tensors="pt")
    images = [[preprocess_image(im, processing) for im in sample] for sample in samples]
    pixel_values, grids = batch_images([image for sample in images for image in sample])

    _exact(pixel_values, expected["pixel_values"])
    _exact(grids, expected["image_grid_thw"])
    for text, sample, row, mask in zip(texts, images, expected["input_ids"], expected["attention_mask"]):
        assert prompt_ids(text, [im.grid for im in sample], processing, tokenizer) == row[mask.bool()].tolist()


def test_pil_backend_has_the_same_geometry(processors_pair):
    """transformers' other image processor, Qwen2VLImageProcessorPil (PIL's filters, then x / 255 in float64 and
    (x - mean) / std in float32), is not what AutoImageProcessor picks; flexvlm follows the torchvision one. The
    two agree on every grid, so on the prompt, and differ in the pixels."""
    processing = processors_pair[0]
    pil = Qwen2VLImageProcessorPil(min_pixels=processing.min_pixels, max_pixels=processing.max_pixels)
    for image in IMAGES.values():
        expected = pil(images=[image if isinstance(image, Image.Image) else image.numpy()], return_tensors="pt")
        assert [list(preprocess_image(image, processing).grid)] == expected["image_grid_thw"].tolist()


@pytest.mark.parametrize(
    "height, width, resized",
    [
        # 100 / 28 = 3.57 -> 4, 150 / 28 = 5.36 -> 5: 112 x 140 = 15680 pixels, within 3136 .. 31360
        (100, 150, (112, 140)),
        # ties round to the even multiple (Python's round): 70 / 28 = 2.5 -> 2, 126 / 28 = 4.5 -> 4
        (70, 126, (56, 112)),
        # 10 x 12 rounds to 0 x 0, under 3136: beta = sqrt(3136 / 120) = 5.11, up to ceil(1.83) = 2 and
        # ceil(2.19) = 3 multiples
        (10, 12, (56, 84)),
        # 504 x 392 is over 31360: beta = sqrt(500 * 400 / 31360) = 2.525, down to floor(7.07) = 7 and
        # floor(5.66) = 5 multiples
        (500, 400, (196, 140)),
        # the long side of a thin image: 2 x 300 -> 0 x 308, up: beta = 2.29, ceil(0.16) = 1 and ceil(24.5) = 25
        (2, 300, (28, 700)),
    ],
)
def test_smart_resize_by_hand(height, width, resized):
    assert smart_resize(height, width, 28, 784 * 4, 784 * 40) == resized


def test_patch_order_by_hand():
    """A 56 x 56 image of 4 x 4 patches of 14 px, each pixel of patch (r, c) valued 4 r + c (+ 16 in the second
    channel, + 32 in the third). With merge 2 the patches come by merge blocks, row-major, each block's 2 x 2
    patches row-major: (0, 0), (0, 1), (1, 0), (1, 1), then (0, 2), (0, 3), (1, 2), (1, 3)... Each row of
    pixel_values is (channel, frame, y, x), the two frames identical."""
    processing = QwenVLProcessing(min_pixels=56 * 56, max_pixels=56 * 56, image_mean=(0.0,) * 3, image_std=(1.0,) * 3,
                                  rescale_factor=1.0, resample=InterpolationMode.NEAREST)
    patch_of_pixel = torch.arange(4).repeat_interleave(14)
    pixels = (patch_of_pixel[:, None] * 4 + patch_of_pixel[None, :]).to(torch.uint8)  # each pixel: its patch r * 4 + c
    image = preprocess_image(torch.stack([pixels, pixels + 16, pixels + 32]), processing)
    assert image.grid == (1, 4, 4) and image.pixel_values.shape == (16, 3 * 2 * 14 * 14)
    rows = image.pixel_values.view(16, 3, 2, 14, 14)
    order = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    expected = torch.tensor(order, dtype=torch.float32)[:, None] + torch.tensor([0.0, 16.0, 32.0])
    _exact(rows.amin((2, 3, 4)), expected)
    _exact(rows.amax((2, 3, 4)), expected)


def test_prompt_by_hand():
    processing = QwenVLProcessing()
    assert image_prompt((1, 4, 6), processing) == "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>"
    assert expand_prompt(f"a{IMAGE}b{IMAGE}", [(1, 2, 2), (1, 4, 2)], processing) == (
        f"a{image_prompt((1, 2, 2), processing)}b{image_prompt((1, 4, 2), processing)}")
    with pytest.raises(ValueError, match="holds 1 <\\|image_pad\\|> but 2 images"):
        expand_prompt(IMAGE, [(1, 2, 2), (1, 2, 2)], processing)
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        num_image_tokens((1, 3, 4), 2)


def test_from_folder_reads_the_hub_layout(tmp_path):
    """The hub's folders (transformers 4.x) save preprocessor_config.json with min_pixels / max_pixels, which
    transformers reads over size."""
    config = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75],
              "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = AutoImageProcessor.from_pretrained(tmp_path)
    processing = QwenVLProcessing.from_folder(tmp_path)
    assert (processing.min_pixels, processing.max_pixels) == (reference.size.shortest_edge, reference.size.longest_edge)
    assert (processing.image_mean, processing.image_std) == ((0.5,) * 3, (0.25, 0.5, 0.75))
    assert processing.resample == InterpolationMode.BICUBIC


def test_refuses_bad_settings_and_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image processor settings"):
        QwenVLProcessing.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(ValueError, match="not a Qwen2-VL / Qwen2.5-VL processor: image_processor_type 'CLIPImage"):
        QwenVLProcessing.from_folder(tmp_path)
    with pytest.raises(ValueError, match="min_pixels 5000 over max_pixels 4000"):
        QwenVLProcessing(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="an aspect ratio over 200"):
        smart_resize(2, 500, 28, 784, 784 * 40)
    with pytest.raises(ValueError, match="both sides must be positive"):
        smart_resize(0, 50, 28, 784, 784 * 40)
    with pytest.raises(TypeError, match=r"\(3, H, W\) uint8 tensor"):
        preprocess_image(torch.zeros(3, 28, 28), QwenVLProcessing())
