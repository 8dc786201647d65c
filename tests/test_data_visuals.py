"""The data pipeline's image seam (flexvlm.data.visuals): a model's own image processor reaches the
built-in task's scenes, the collator's prompts and the vocabulary; non-square scenes by hand."""

import json

import pytest
import torch
from PIL import Image

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.collate import SequenceLimits
from flexvlm.data.benchmark_datamodule import load_processed
from flexvlm.data.datamodule import SyntheticVQADataModule
from flexvlm.data.llava import LlavaInstructDataset
from flexvlm.data.synthetic import WORDS, SyntheticVQA, aux_targets, render_sample
from flexvlm.data.visuals import ImageProcessor, SquareImages


class TwoViews(ImageProcessor):
    """A toy architecture: the image as one tensor, a prompt of a marker word and one placeholder
    per token of its 2 x 2 low-res view."""

    sample_keys = ("image",)
    special_tokens = ("<view>", "red")  # "red" is already the task's: it keeps its id
    view_size, view_tokens = 16, 2

    def process(self, image):
        return {"image": torch.tensor(list(image.size))}

    def collate(self, samples):
        return {"images": torch.stack([s["image"] for s in samples])}

    def pictures(self, images):
        raise NotImplementedError

    def image_ids(self, sample, tokenizer):
        return tokenizer.encode("<view>") + [IMAGE_TOKEN_INDEX] * 4


def test_a_models_processor_sizes_the_scenes_and_expands_the_prompts():
    data = SyntheticVQADataModule(num_train=4, num_val=2, num_test=2, batch_size=2, image_size=None,
                                  patch_size=None, views=(2, 3))
    data.setup("fit")
    assert data.splits == {}  # no geometry before the model is known
    red = data.tokenizer.word_to_id["red"]
    data.fit_to_model(SequenceLimits(100, 200, 200), TwoViews())
    assert data.tokenizer.word_to_id["red"] == red and data.tokenizer.vocab_size == 4 + len(WORDS) + 1
    train = data.splits["train"]
    # 2 x 3 views of 16 px: 32 x 48 px, a token per 8 px (16 px / 2 tokens), a low-res cell per 2 x 3 tokens
    assert (train.image_size, train.patch_size, train.zoom) == ((32, 48), 8, (2, 3))
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].tolist() == [[48, 32], [48, 32]]  # PIL sizes are (width, height)
    view = data.tokenizer.word_to_id["<view>"]
    for ids, labels, prompt in zip(batch["input_ids"], batch["labels"], batch["prompt_ids"]):
        at = ids.tolist().index(view)
        assert ids[at + 1: at + 5].tolist() == [IMAGE_TOKEN_INDEX] * 4
        assert labels[at: at + 5].tolist() == [IGNORE_INDEX] * 5
        assert (prompt == IMAGE_TOKEN_INDEX).sum() == 4
    assert batch["aux_lr_colour"].shape == (2, 4) and batch["aux_hr_colour"].shape == (2, 4 * 6)


def test_views_of_no_whole_token_size_are_refused():
    class Ragged(TwoViews):
        view_size, view_tokens = 384, 27  # SigLIP so400m's: 14.2 px a token

    data = SyntheticVQADataModule(num_train=2, num_val=2, num_test=2, image_size=None, patch_size=None)
    data.setup("fit")
    with pytest.raises(ValueError, match="views of 384 px hold 27 x 27 tokens, no whole number of pixels"):
        data.fit_to_model(SequenceLimits(100, 200, 200), Ragged())


def test_real_image_datasets_take_a_models_processor(tmp_path):
    """LLaVA-format data and benchmark images reach an architecture's processor as they are (any size)."""
    Image.new("RGB", (40, 24), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "q", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}]}]))
    llava = LlavaInstructDataset(tmp_path / "data.json", tmp_path, image_size=None, processor=TwoViews())
    assert llava[0]["image"].tolist() == [40, 24] and "content_box" not in llava[0]
    assert load_processed(str(tmp_path / "a.png"), TwoViews())["image"].tolist() == [40, 24]
    square = LlavaInstructDataset(tmp_path / "data.json", tmp_path, image_size=32)[0]  # LLaVA-1.5's by default
    # 24 rows centred in a 40 px square: 8 px of padding above and below
    assert square["image"].shape == (3, 32, 32) and square["content_box"].tolist() == pytest.approx([0.2, 0, 0.8, 1])


def test_non_square_scenes_by_hand():
    scene = render_sample(0, 3, image_size=(32, 48), patch_size=8, zoom=(2, 3), num_tiles=(2, 4))
    assert scene.image.size == (48, 32)
    cells = {(t.row // 2, t.col // 3) for t in scene.tiles}
    assert len(cells) == len(scene.tiles)  # at most one tile per low-res cell of 2 x 3 tokens
    targets = aux_targets(scene.tiles, scene.query, (32, 48), 8, (2, 3))
    query = scene.query
    assert targets["aux_query_cell"] == query.row // 2 * 2 + query.col // 3
    assert targets["aux_hr_digit"][query.row * 6 + query.col] == query.digit
    with pytest.raises(ValueError, match="needs the model's image processor"):
        SyntheticVQA(2, 0, image_size=(32, 48), patch_size=8, zoom=(2, 3))[0]


def test_square_scenes_are_unchanged_by_the_seam():
    """The default processor of a square scene is LLaVA-1.5's preprocessing, as before."""
    sample = SyntheticVQA(2, 0)[1]
    image, box = SquareImages(96, (0.5,) * 3, (0.5,) * 3).process(render_sample(0, 1).image).values()
    assert torch.equal(sample["image"], image) and torch.equal(sample["content_box"], box)


def test_bracketed_words_are_split_out_of_running_text():
    from flexvlm.data.tokenizer import WordTokenizer

    base = WordTokenizer(["red", "3"])
    tokenizer = base.with_words(["<view>", "<row_1_col_1>", "red"])
    assert tokenizer.word_to_id["red"] == base.word_to_id["red"] and tokenizer.vocab_size == base.vocab_size + 2
    view, cell = tokenizer.word_to_id["<view>"], tokenizer.word_to_id["<row_1_col_1>"]
    # as an HF tokenizer splits its added tokens: no space needed around them; newlines separate words
    assert tokenizer.encode("<view><row_1_col_1><image>\nred 3") == [view, cell, IMAGE_TOKEN_INDEX, 4, 5]
    assert base.encode("<view>red") == [base.unk_id]  # unknown to the base vocabulary: one word
