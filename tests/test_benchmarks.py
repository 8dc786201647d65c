"""Benchmark readers on tiny files in the released formats."""

import json
from pathlib import Path

import pytest
from PIL import Image

from flexvlm.data.benchmarks import (
    RSVQAHR,
    BenchmarkDataset,
    BenchmarkItem,
    BenchmarkReader,
    LlavaQuestions,
    MagnifierBench,
    TextVQA,
    VStar,
)
from flexvlm.data.benchmark_datamodule import load_preprocessed
from flexvlm.data.image import CLIP_MEAN, CLIP_STD
from flexvlm.data.problems import BadSample

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (10, 20, 30)).save(path)


def _items(reader: BenchmarkReader) -> list[BenchmarkItem]:
    """What the reader reads from files with nothing wrong in them."""
    items, problems = reader.read()
    assert problems == []
    return items


def _problem(reader: BenchmarkReader) -> str:
    """The one problem the reader finds."""
    _, [problem] = reader.read()
    return str(problem)


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_textvqa(tmp_path):
    answers = ["nokia"] * 7 + ["nokia phone"] * 3
    ann = _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what brand is this?",
         "answers": answers, "image_classes": ["phone"]},
    ]})
    _image(tmp_path / "images" / "003a8ae2ef43b901.jpg")
    [item] = _items(TextVQA(ann, tmp_path / "images"))
    assert item == BenchmarkItem(
        question_id="34602",
        image_path=str(tmp_path / "images" / "003a8ae2ef43b901.jpg"),
        prompt=f"<image>\nwhat brand is this?\n{SHORT}",
        answers=answers,
        where=f"{ann} entry 0",
    )


def test_textvqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TextVQA(tmp_path / "missing.json", tmp_path).read()
    with pytest.raises(FileNotFoundError, match="no_images"):
        TextVQA(tmp_path / "x.json", tmp_path / "no_images").read()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: malformed JSON at line 1 column 2"):
        TextVQA(bad, tmp_path).read()
    no_data = _json(tmp_path / "no_data.json", {"questions": []})
    with pytest.raises(ValueError, match="'data'"):
        TextVQA(no_data, tmp_path).read()
    no_question = _json(tmp_path / "no_q.json", {"data": [{"question_id": 1, "image_id": "a",
                                                           "answers": ["x"]}]})
    assert "no_q.json entry 0 (id 1): missing key 'question'" in _problem(TextVQA(no_question, tmp_path))


def _vstar(root: Path) -> None:
    for subset, stem, question, options in [
        ("direct_attributes", "sa_1", "What is the color of the cup?",
         ["The color of the cup is red.", "The color of the cup is blue.",
          "The color of the cup is green.", "The color of the cup is white."]),
        ("direct_attributes", "sa_0", "What is the material of the bag?",
         ["leather", "cloth", "plastic", "paper"]),
        ("relative_position", "sa_9", "Is the dog on the left or right side of the car?",
         ["The dog is on the left side of the car.", "The dog is on the right side of the car."]),
    ]:
        _image(root / subset / f"{stem}.jpg")
        _json(root / subset / f"{stem}.json", {"target_object": ["x"], "bbox": [[0, 0, 1, 1]],
                                               "question": question, "options": options})


def test_vstar(tmp_path):
    _vstar(tmp_path)
    items = _items(VStar(tmp_path))
    assert [i.question_id for i in items] == [
        "direct_attributes/sa_0", "direct_attributes/sa_1", "relative_position/sa_9"]
    first, _, last = items
    assert first.prompt == "<image>\nWhat is the material of the bag?"
    assert first.options == ["leather", "cloth", "plastic", "paper"]
    assert (first.answer_index, first.answers, first.qtype) == (0, ["leather"], "direct_attributes")
    assert first.image_path == str(tmp_path / "direct_attributes" / "sa_0.jpg")
    assert last.qtype == "relative_position" and len(last.options) == 2


def test_vstar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="direct_attributes"):
        VStar(tmp_path).read()
    _vstar(tmp_path)
    _image(tmp_path / "relative_position" / "orphan.jpg")
    assert "V* Bench annotation not found" in _problem(VStar(tmp_path))
    _json(tmp_path / "relative_position" / "orphan.json", {"question": "Where?"})
    assert "orphan.json (id relative_position/orphan): missing key 'options'" in _problem(VStar(tmp_path))


def test_magnifierbench_with_option_lists(tmp_path):
    _image(tmp_path / "images" / "1.png")
    ann = _json(tmp_path / "magnifier.json", [
        {"id": "mb_1", "image": "images/1.png", "question": "What colour is the kite?",
         "options": ["red", "blue", "yellow", "green"], "answer": "C"},
        {"question_id": 2, "image_path": "images/1.png", "instruction": "How many birds?",
         "choices": ["1", "2"], "answer": 1},
        {"id": 3, "images": ["images/1.png"], "question": "Is it day?", "options": ["yes", "no"],
         "answer": "No"},
    ])
    first, second, third = _items(MagnifierBench(ann))
    assert first.prompt == ("<image>\nWhat colour is the kite?\nA. red\nB. blue\nC. yellow\n"
                            f"D. green\n{LETTER}")
    assert (first.question_id, first.answer_index, first.answers) == ("mb_1", 2, ["C"])
    assert first.image_path == str(tmp_path / "images" / "1.png")
    assert second.prompt == f"<image>\nHow many birds?\nA. 1\nB. 2\n{LETTER}"
    assert (second.question_id, second.answer_index, second.answers) == ("2", 1, ["B"])
    assert (third.answer_index, third.image_path) == (1, str(tmp_path / "images" / "1.png"))


def test_magnifierbench_inline_options_as_released(tmp_path):
    ann = _json(tmp_path / "m.json", [{
        "id": "q7", "image": "7.jpg", "answer": "B",
        "instruction": "What is written on the sign? A. stop, B. exit, C. St. Louis, D. open.",
    }])
    [item] = _items(MagnifierBench(ann, image_root=tmp_path / "imgs"))
    assert item.options == ["stop", "exit", "St. Louis", "open"]
    assert item.prompt == ("<image>\nWhat is written on the sign?\nA. stop\nB. exit\n"
                           f"C. St. Louis\nD. open\n{LETTER}")
    assert (item.answer_index, item.image_path) == (1, str(tmp_path / "imgs" / "7.jpg"))


def test_magnifierbench_errors(tmp_path):
    entry = {"id": 1, "image": "a.jpg", "question": "Q?", "options": ["x", "y"], "answer": "A"}
    for key, message in [("image", "missing key 'image' / 'image_path' / 'images'"),
                         ("answer", "missing key 'answer'"),
                         ("options", "missing key 'options' / 'choices'")]:
        broken = {k: v for k, v in entry.items() if k != key}
        assert message in _problem(MagnifierBench(_json(tmp_path / "m.json", [broken])))
    assert "matches none" in _problem(MagnifierBench(_json(tmp_path / "m.json", [{**entry, "answer": "C"}])))
    with pytest.raises(ValueError, match="JSON list"):
        MagnifierBench(_json(tmp_path / "m.json", {"data": [entry]})).read()


def _rsvqa(root: Path) -> None:
    _json(root / "USGS_split_test_questions.json", {"questions": [
        {"id": 0, "img_id": 5, "type": "presence", "question": "Is there a road?",
         "answers_ids": [0], "active": True, "people_id": 1},
        {"id": 1, "img_id": 5, "type": "comp",
         "question": "Is the number of buildings larger than the number of roads?",
         "answers_ids": [1], "active": True},
        {"id": 2, "img_id": 6, "type": "count", "question": "How many buildings are there?",
         "answers_ids": [2], "active": True},
        {"id": 3, "img_id": 6, "type": "presence", "question": "Is there water?",
         "answers_ids": [3], "active": False},
    ]})
    _json(root / "USGS_split_test_answers.json", {"answers": [
        {"id": 0, "question_id": 0, "answer": "yes", "active": True},
        {"id": 1, "question_id": 1, "answer": "no", "active": True},
        {"id": 2, "question_id": 2, "answer": "12", "active": True},
        {"id": 3, "question_id": 3, "answer": "no", "active": False},
    ]})
    _image(root / "Data" / "5.tif")
    _image(root / "Data" / "6.png")


def test_rsvqa_hr(tmp_path):
    _rsvqa(tmp_path)
    presence, comparison = _items(RSVQAHR(tmp_path))
    assert presence == BenchmarkItem(
        question_id="0", image_path=str(tmp_path / "Data" / "5.tif"),
        prompt=f"<image>\nIs there a road?\n{SHORT}", answers=["yes"], qtype="presence",
        where=f"{tmp_path / 'USGS_split_test_questions.json'} entry 0")
    assert (comparison.qtype, comparison.answers) == ("comparison", ["no"])
    every = _items(RSVQAHR(tmp_path, qtypes=None))
    assert [(i.question_id, i.qtype) for i in every] == [
        ("0", "presence"), ("1", "comparison"), ("2", "count")]
    assert every[2].image_path == str(tmp_path / "Data" / "6.png")


def test_rsvqa_hr_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="USGS_split_test_questions.json"):
        RSVQAHR(tmp_path).read()
    _rsvqa(tmp_path)
    with pytest.raises(FileNotFoundError, match="USGS_split_val_questions.json"):
        RSVQAHR(tmp_path, split="val").read()
    (tmp_path / "Data" / "5.tif").unlink()  # named with the suffixes tried, for the datamodule to report
    assert _items(RSVQAHR(tmp_path))[0].image_path == str(tmp_path / "Data" / "5{.tif,.png}")


def test_llava_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        {"question_id": 1, "image": "a.jpg", "text": f"What is it?\n{SHORT}", "answer": "cat"},
        {"question_id": "q2", "image": "b.jpg", "text": "<image>\nDescribe.",
         "answers": ["x", "y"], "category": "conv"},
        {"question_id": 3, "image": "c.jpg", "text": "Where?"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first, second, third = _items(LlavaQuestions(path, tmp_path / "img"))
    assert first == BenchmarkItem(question_id="1", image_path=str(tmp_path / "img" / "a.jpg"),
                                  prompt=f"<image>\nWhat is it?\n{SHORT}", answers=["cat"], where=f"{path} line 1")
    assert (second.prompt, second.answers, second.qtype) == ("<image>\nDescribe.", ["x", "y"],
                                                             "conv")
    assert third.answers == []
    path.write_text(json.dumps(lines[0]) + "\n{oops\n")
    assert "q.jsonl line 2: malformed JSON at line 1 column 2" in _problem(LlavaQuestions(path, tmp_path))


def test_benchmark_dataset_loads_lazily(tmp_path):
    _vstar(tmp_path)
    calls = []

    def load(path: str) -> dict:
        calls.append(path)
        with Image.open(path) as image:
            return {"image_size": image.size}

    dataset = BenchmarkDataset(_items(VStar(tmp_path)), load)
    assert len(dataset) == 3 and calls == []
    sample = dataset[2]
    assert calls == [str(tmp_path / "relative_position" / "sa_9.jpg")]
    assert sample == {
        "question_id": "relative_position/sa_9",
        "question": "<image>\nIs the dog on the left or right side of the car?",
        "answers": ["The dog is on the left side of the car."],
        "options": ["The dog is on the left side of the car.",
                    "The dog is on the right side of the car."],
        "answer_index": 0,
        "qtype": "relative_position",
        "where": str(tmp_path / "relative_position" / "sa_9.json"),
        "image_size": (16, 12),
    }
    with pytest.raises(ValueError, match="question"):
        BenchmarkDataset(dataset.items, lambda path: {"question": "x"})[0]
    (tmp_path / "relative_position" / "sa_9.jpg").write_bytes(b"not an image")
    with pytest.raises(BadSample, match=r"sa_9.json \(id relative_position/sa_9\): cannot decode image"):
        BenchmarkDataset(dataset.items, load_preprocessed_96)[2]


def load_preprocessed_96(path: str) -> dict:
    return load_preprocessed(path, 96, CLIP_MEAN, CLIP_STD)
