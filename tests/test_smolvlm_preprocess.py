"""SmolVLM / Idefics3 preprocessing (flexvlm.architectures.smolvlm.preprocess) against transformers'
processors, built offline with small sizes and a tokenizer trained here, and layouts by hand."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torchvision.transforms import InterpolationMode
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.smolvlm import processing_smolvlm

from flexvlm.architectures.smolvlm.preprocess import (
    ImageLayout,
    SmolVLMProcessing,
    batch_images,
    expand_prompt,
    image_prompt,
    prompt_ids,
    split_image,
)

TILE = 64
IMAGE_SEQ_LEN = 4
BOS = "<|begin_of_text|>"
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

# processor settings: (family, size.longest_edge, do_image_splitting, resample, SmolVLM's global-image spelling)
CONFIGS = {
    "smolvlm-192": ("smolvlm", 192, True, 1, "<global-img>"),
    "idefics3-128": ("idefics3", 128, True, 1, "<global-img>"),
    # a longest edge that is no multiple of the tile (step 2 recomputes the short side), bicubic, and a
    # tokenizer that spells the global-image token its own way (SmolVLMProcessor asks the tokenizer)
    "smolvlm-160-bicubic": ("smolvlm", 160, True, 3, "<global_view>"),
    "idefics3-64-never-split": ("idefics3", 64, True, 1, "<global-img>"),
    "smolvlm-no-splitting": ("smolvlm", 128, False, 1, "<global-img>"),
}

_rng = np.random.default_rng(0)


def _noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Noise, the hardest content for a resampling filter to agree on."""
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(_rng.integers(0, 256, shape, dtype=np.uint8), mode)


IMAGES = {
    "square": _noise(96, 96),
    "wide-3:1": _noise(300, 100),
    "tall-1:2": _noise(50, 100),
    "smaller-than-a-tile": _noise(40, 30),
    "larger-than-max": _noise(500, 450),
    "200x100": _noise(200, 100),
    "rgba": _noise(70, 90, "RGBA"),
    "grey": _noise(120, 80, "L"),
    "uint8-tensor": torch.from_numpy(_rng.integers(0, 256, (3, 80, 150), dtype=np.uint8)),
}


def _tokenizer(family: str, global_image_token: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the image special tokens; Idefics3's (Llama 3's) adds BOS itself."""
    specials = ["<|endoftext|>", BOS, "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                global_image_token]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + ROW_COL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # "\n\n" becomes one token, as in SmolLM2's and Llama 3's vocabularies: the newline that ends the last
    # row of tiles and the one before the global view then merge, as transformers encodes them
    tok.train_from_iterator(["User: What is in the picture?\n\nAssistant: A cat.\n\n\n\n"] * 10, trainer)
    if family == "idefics3":
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token="<|endoftext|>")
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": global_image_token, "end_of_utterance_token": "<end_of_utterance>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", extra_special_tokens=named)


@pytest.fixture(scope="module", params=list(CONFIGS))
def processors_pair(request, tmp_path_factory):
    """(flexvlm's settings, transformers' processor) of one folder saved by transformers."""
    family, longest_edge, splitting, resample, global_token = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    sizes = dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": TILE},
                 do_image_splitting=splitting, resample=resample)
    tokenizer = _tokenizer(family, global_token)
    # SmolVLMProcessor refuses to start without num2words, which it needs only for video prompts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processing_smolvlm, "num2words", str)
        if family == "smolvlm":
            SmolVLMProcessor(SmolVLMImageProcessor(**sizes), tokenizer, SmolVLMVideoProcessor(),
                             image_seq_len=IMAGE_SEQ_LEN).save_pretrained(folder)
        else:
            Idefics3Processor(Idefics3ImageProcessor(**sizes), tokenizer,
                              image_seq_len=IMAGE_SEQ_LEN).save_pretrained(folder)
        reference = AutoProcessor.from_pretrained(folder)
    # the premise: transformers 5's default is the torchvision image processor, the one matched here
    assert reference.image_processor.backend == "torchvision"
    processing = SmolVLMProcessing.from_folder(folder)
    assert processing.family == family and processing.global_image_token == global_token
    return processing, reference, Tokenizer.from_file(str(folder / "tokenizer.json"))


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(IMAGES))
def test_views_and_ids_equal_transformers(processors_pair, name):
    processing, reference, tokenizer = processors_pair
    image = IMAGES[name]
    text = "User:<image>What is in the picture?<end_of_utterance>\nAssistant:"
    expected = reference(images=[[image]], text=[text], return_tensors="pt")
    rows_cols = reference.image_processor([[image]], return_row_col_info=True)
    split = split_image(image, processing)

    _exact(split.pixel_values, expected["pixel_values"][0])
    assert (split.layout.rows, split.layout.cols) == (rows_cols["rows"][0][0], rows_cols["cols"][0][0])
    assert split.layout.num_views == split.pixel_values.shape[0]
    assert prompt_ids(text, [split.layout], processing, tokenizer) == expected["input_ids"][0].tolist()


def test_batch_equal_transformers(processors_pair):
    """Samples of one, two and one image, different tile counts: zero views pad the shorter ones."""
    processing, reference, tokenizer = processors_pair
    samples = [[IMAGES["wide-3:1"]], [IMAGES["smaller-than-a-tile"], IMAGES["tall-1:2"]], [IMAGES["larger-than-max"]]]
    texts = ["<image>Describe it.", "Compare <image> with\n<image>.", "User:<image>"]
    expected = reference(images=samples, text=texts)
    batch = batch_images(samples, processing)

    _exact(batch.pixel_values, expected["pixel_values"])
    _exact(batch.pixel_attention_mask, expected["pixel_attention_mask"])
    for text, layouts, ids in zip(texts, batch.layouts, expected["input_ids"]):
        assert prompt_ids(text, layouts, processing, tokenizer) == ids
    if processing.family == "idefics3":  # its tokenizer adds BOS; prompt_ids leaves that to it
        assert all(ids[0] == tokenizer.token_to_id(BOS) for ids in expected["input_ids"])


def _settings(longest_edge: int, do_image_splitting: bool = True) -> SmolVLMProcessing:
    return SmolVLMProcessing(family="smolvlm", tile_size=TILE, longest_edge=longest_edge,
                             do_image_splitting=do_image_splitting, resample=InterpolationMode.LANCZOS,
                             image_mean=(0.5,) * 3, image_std=(0.5,) * 3, rescale_factor=1 / 255, image_seq_len=2)


@pytest.mark.parametrize(
    "width, height, longest_edge, splitting, rows, cols, resized",
    [
        # 200 x 100, longest edge 128: width 128, height int(128 / 2.0) = 64 (even); both are already
        # multiples of 64, so 64 x 128 is cut into 1 row x 2 columns of 64 x 64
        (200, 100, 128, True, 1, 2, (64, 128)),
        # the same standing up: height 128, width 64 -> 2 rows x 1 column
        (100, 200, 128, True, 2, 1, (128, 64)),
        # 30 x 20 is upscaled: width 128, height int(128 / 1.5) = 85, odd -> 86; step 2 recomputes
        # int(128 / 1.5) = 85 and rounds it up to 128: 2 x 2 tiles, the image stretched 1.5x in height
        (30, 20, 128, True, 2, 2, (128, 128)),
        # longest edge 160: width 160, height 80; step 2: width up to 192, height int(192 / 2.0) = 96
        # up to 128: 2 x 3 tiles (the height is stretched 1.6x, the width 1.2x)
        (200, 100, 160, True, 2, 3, (128, 192)),
        # longest edge 64: width 64, height 32 -> 64 x 64, a single tile: not split, one view
        (200, 100, 64, True, 0, 0, (64, 64)),
        # splitting off: resized to 64 x 64 whatever the size, one view
        (200, 100, 192, False, 0, 0, (64, 64)),
    ],
)
def test_layout_by_hand(width, height, longest_edge, splitting, rows, cols, resized):
    split = split_image(_noise(width, height), _settings(longest_edge, splitting))
    assert split.layout == ImageLayout(rows, cols, TILE, original_size=(height, width), resized_size=resized)
    assert split.pixel_values.shape == (rows * cols + 1, 3, TILE, TILE)
    assert split.layout.global_view == rows * cols


def test_view_boxes_and_prompt_by_hand():
    """200 x 100 at longest edge 128: 1 x 2 tiles, the left half, the right half, then the global view."""
    processing = _settings(128)
    layout = split_image(_noise(200, 100), processing).layout
    boxes = [layout.view_box(v) for v in range(3)]
    assert boxes == [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)]
    with pytest.raises(IndexError):
        layout.view_box(3)
    fake, image = "<fake_token_around_image>", "<image>" * 2
    assert image_prompt(layout, processing) == (
        f"{fake}<row_1_col_1>{image}{fake}<row_1_col_2>{image}\n\n{fake}<global-img>{image}{fake}"
    )
    unsplit = ImageLayout(0, 0, TILE, (100, 200), (TILE, TILE))
    assert expand_prompt("a<image>b", [unsplit], processing) == f"a{fake}<global-img>{image}{fake}b"
    with pytest.raises(ValueError, match="holds 1 <image> but 2 images"):
        expand_prompt("a<image>b", [unsplit, unsplit], processing)


def test_from_folder_reads_the_4x_layout(tmp_path):
    """transformers 4.x saved the image processor beside processor_config.json, in preprocessor_config.json."""
    Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": TILE}, resample=3,
                           image_mean=[0.25, 0.5, 0.75]).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"image_seq_len": 7, "processor_class": "Idefics3Processor"}')
    processing = SmolVLMProcessing.from_folder(tmp_path)
    assert (processing.family, processing.tile_size, processing.longest_edge) == ("idefics3", TILE, 128)
    assert (processing.resample, processing.image_mean, processing.image_seq_len) == (
        InterpolationMode.BICUBIC, (0.25, 0.5, 0.75), 7)


def test_refuses_other_folders_and_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a SmolVLM / Idefics3 processor folder"):
        SmolVLMProcessing.from_folder(tmp_path)
    CLIPImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a SmolVLM / Idefics3 processor folder.*CLIPImageProcessor"):
        SmolVLMProcessing.from_folder(tmp_path)
    with pytest.raises(TypeError, match=r"\(3, H, W\) uint8 tensor, got Tensor \(3, 8, 8\) torch.float32"):
        split_image(torch.zeros(3, 8, 8), _settings(128))
