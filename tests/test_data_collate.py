"""The collator on hand-built samples, and the LLaVA-format dataset on files written in tmp."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.collate import VQACollator, sample_conversation
from flexvlm.data.llava import LlavaInstructDataset
from flexvlm.data.image import CLIP_MEAN, CLIP_STD
from flexvlm.data.problems import BadSample
from flexvlm.data.templates import PlainTemplate, VicunaV1Template
from flexvlm.data.tokenizer import WordTokenizer

IMG = IMAGE_TOKEN_INDEX
X = IGNORE_INDEX
TOK = WordTokenizer(["red", "blue", "7", "3", "why?", "because"])
RED, BLUE, SEVEN, THREE, WHY, BECAUSE = range(4, 10)
PAD, EOS = TOK.pad_id, TOK.eos_id


def sample(**fields) -> dict:
    return {"image": torch.zeros(3, 4, 4), "content_box": torch.tensor([0.0, 0.0, 1.0, 1.0]), **fields}


def test_collator_pads_and_masks_hand_built_batch():
    samples = [
        sample(question="red", answer="7", question_id="q0", aux_lr_colour=torch.tensor([1, 0])),
        sample(
            conversations=[
                {"from": "human", "value": "<image> blue"},
                {"from": "gpt", "value": "3"},
                {"from": "human", "value": "why?"},
                {"from": "gpt", "value": "because"},
            ],
            question_id=7,
            aux_lr_colour=torch.tensor([0, 2]),
        ),
    ]
    batch = VQACollator(TOK, PlainTemplate())(samples)
    assert batch["input_ids"].tolist() == [
        [IMG, RED, SEVEN, EOS, PAD, PAD, PAD],
        [IMG, BLUE, THREE, EOS, WHY, BECAUSE, EOS],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [
        [X, X, SEVEN, EOS, X, X, X],
        [X, X, THREE, EOS, X, BECAUSE, EOS],
    ]
    # generation view: everything before the last reply, left-padded
    assert batch["prompt_ids"].tolist() == [[PAD, PAD, PAD, IMG, RED], [IMG, BLUE, THREE, EOS, WHY]]
    assert batch["prompt_mask"].tolist() == [[0, 0, 0, 1, 1], [1] * 5]
    assert batch["answers"] == [["7"], ["because"]]
    assert batch["question_id"] == ["q0", "7"]
    assert batch["images"].shape == (2, 3, 4, 4) and batch["content_box"].shape == (2, 4)
    assert batch["aux_lr_colour"].tolist() == [[1, 0], [0, 2]]
    for key in ("input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"):
        assert batch[key].dtype == torch.long
    for key in ("input_ids", "prompt_ids"):
        assert ((batch[key] == IMG).sum(1) == 1).all()


def test_collator_pad_to_multiple_and_answers_list():
    batch = VQACollator(TOK, PlainTemplate(), pad_to_multiple=8)(
        [sample(question="red", answer="7", answers=["7", "seven"])]
    )
    assert batch["input_ids"].tolist() == [[IMG, RED, SEVEN, EOS, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[X, X, SEVEN, EOS, X, X, X, X]]
    assert batch["prompt_ids"].tolist() == [[PAD] * 6 + [IMG, RED]]
    assert batch["answers"] == [["7", "seven"]]
    assert "aux_lr_colour" not in batch


def test_benchmark_style_sample_without_answer_keeps_extra_fields():
    bench = sample(question="<image>\nred", answers=["7", "7", "seven"], options=None, qtype="ocr")
    no_reference = sample(question="blue", answers=[], options=["3", "7"], qtype="mc")
    batch = VQACollator(TOK, PlainTemplate())([bench, no_reference])
    assert batch["input_ids"].tolist() == [[IMG, RED, SEVEN, EOS], [IMG, BLUE, EOS, PAD]]
    assert batch["prompt_ids"].tolist() == [[IMG, RED], [IMG, BLUE]]
    assert batch["answers"] == [["7", "7", "seven"], []]
    assert batch["options"] == [None, ["3", "7"]] and batch["qtype"] == ["ocr", "mc"]
    assert batch["question"] == ["<image>\nred", "blue"]


def test_image_placeholder_is_added_once_like_llava():
    conversation = sample_conversation(sample(question="red", answer="7"))
    assert conversation == [{"from": "human", "value": "<image>\nred"}, {"from": "gpt", "value": "7"}]
    given = [{"from": "human", "value": "red <image>"}, {"from": "gpt", "value": "7"}]
    assert sample_conversation(sample(conversations=given)) == given


def test_collator_rejects_two_images():
    two = sample(
        conversations=[{"from": "human", "value": "<image> <image> red"}, {"from": "gpt", "value": "7"}]
    )
    with pytest.raises(BadSample, match="2 <image> placeholders"):
        VQACollator(TOK, PlainTemplate())([two])


# ---------------------------------------------------------------- LLaVA-format data


@pytest.fixture
def llava_files(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(images / "coco" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / "square.jpg")
    entries = [
        {
            "id": "a1",
            "image": "coco/wide.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": 2,
            "image": "square.jpg",
            "conversations": [
                {"from": "human", "value": "Describe it.\n<image>"},
                {"from": "gpt", "value": "blue"},
            ],
        },
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    return path, images, entries


def test_llava_dataset_items_and_vicuna_batch(llava_files):
    path, images, entries = llava_files
    dataset = LlavaInstructDataset(path, images, image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    assert len(dataset) == 2
    first = dataset[0]
    assert first["image"].shape == (3, 32, 32)
    assert first["content_box"].tolist() == [0.25, 0.0, 0.75, 1.0]  # 60 x 30 padded to 60 x 60
    assert first["conversations"] == entries[0]["conversations"] and first["question_id"] == "a1"
    assert dataset[1]["question_id"] == "2"

    words = [*VicunaV1Template.system.split(), "USER:", "ASSISTANT:", "What", "colour?", "red", "blue"]
    tok = WordTokenizer(sorted(set(words)))
    batch = VQACollator(tok, VicunaV1Template())([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 32, 32)
    answers = [tok.decode([l for l in row if l != X]) for row in batch["labels"].tolist()]
    assert answers == ["red", "blue"] and batch["answers"] == [["red"], ["blue"]]
    assert (batch["labels"] == tok.eos_id).sum(1).tolist() == [1, 1]  # each reply closed by </s>


def test_llava_dataset_image_gone_after_reading_is_a_bad_sample_naming_it(llava_files):
    path, images, _ = llava_files
    dataset = LlavaInstructDataset(path, images, image_size=32)
    (images / "square.jpg").unlink()
    with pytest.raises(BadSample, match=r"data.json entry 1 \(id 2\): image not found: .*square.jpg"):
        dataset[1]


def test_llava_dataset_corrupt_image_is_a_bad_sample(llava_files):
    path, images, _ = llava_files
    (images / "coco" / "wide.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BadSample, match=r"entry 0 \(id a1\): cannot decode image .*wide.png"):
        LlavaInstructDataset(path, images, image_size=32)[0]


def test_llava_dataset_leaves_out_text_only_entries_and_lists_them(tmp_path, llava_files):
    path, images, entries = llava_files
    text_only = tmp_path / "text.json"
    no_image = {"id": "t9", "conversations": entries[0]["conversations"]}
    text_only.write_text(json.dumps(entries + [no_image]))
    dataset = LlavaInstructDataset(text_only, images, image_size=32)
    assert len(dataset) == 2 and dataset.sample_ids() == ["a1", "2"]
    [problem] = dataset.problems
    assert (problem.where, problem.sample_id) == (f"{text_only} entry 2", "t9") and "no 'image'" in problem.what
    with pytest.raises(FileNotFoundError, match="absent.json"):
        LlavaInstructDataset(tmp_path / "absent.json", images, image_size=32)
