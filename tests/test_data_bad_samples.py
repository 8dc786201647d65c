"""Bad inputs, one at a time, in tiny files: the data check names each (file, entry, id, what is
wrong), ``on_bad_sample: skip`` leaves the sample out and lists it, ``error`` stops naming it; files
that cannot be read at all fail naming the file and the place."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexvlm.data.benchmark_datamodule import BenchmarkDataModule
from flexvlm.data.benchmarks import LlavaQuestions, MagnifierBench, TextVQA, VStar
from flexvlm.data.check import check_splits
from flexvlm.data.collate import SequenceLimits
from flexvlm.data.datamodule import LlavaDataModule
from flexvlm.data.problems import BadSample
from flexvlm.data.tokenizer import load_tokenizer

from test_data_image import write_png
from test_data_tokenizer import write_hf_tokenizer

LIMITS = SequenceLimits(vocab_size=160, max_length=200, max_prompt_length=190)  # a sample here is ~100 ids
QUESTION = {"from": "human", "value": "<image>\nWhat is the colour of the sky?"}
REPLY = {"from": "gpt", "value": "It is blue"}
LONG = " ".join(["the grass is green"] * 60)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe") / "tok"
    write_hf_tokenizer(folder)
    return folder


def _picture(path: Path, size=(24, 16), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if len(mode) == 1 else pixels, mode).save(path)


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        _picture(path, (64, 48))
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_text("this is not an image")


# name -> (how to spoil entry 1 of four good ones, what the problem says, its severity)
def _set(key, value):
    return lambda entry, folder: entry.__setitem__(key, value)


def _image(size=(24, 16), mode="RGB", damage=None):
    def spoil(entry, folder):
        entry["image"] = f"bad.{'png' if mode == 'RGBA' or size[0] > 1000 else 'jpg'}"
        _picture(folder / entry["image"], size, mode)
        if damage:
            _damage(folder / entry["image"], damage)
    return spoil


def _claimed_size(width: int, height: int):
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def spoil(entry, folder):
        entry["image"] = "bomb.png"
        write_png(folder / "bomb.png", width, height)
    return spoil


def _turns(*turns):
    return _set("conversations", list(turns))


LLAVA_CASES = {
    "missing image file": (_set("image", "nowhere.jpg"), "image not found: ", "error"),
    "truncated jpeg": (_image(damage="truncated"), "cannot decode image", "error"),
    "non-image bytes": (_image(damage="text"), "cannot decode image", "error"),
    "1x1 image": (_image(size=(1, 1)), "1 x 1 pixels, under 8 on a side", "error"),
    "8000x100 image": (_image(size=(8000, 100)), "8000 x 100 pixels, an aspect ratio over 20", "error"),
    # over Pillow's default limit (max_image_pixels' default), and over twice it, where Pillow raises
    "image over max_image_pixels": (_claimed_size(10000, 9000), "10000 x 9000 pixels, over the limit of 89478485",
                                    "error"),
    "decompression bomb": (_claimed_size(20000, 10000), "could be decompression bomb", "error"),
    "rgba image": (_image(mode="RGBA"), "the image has transparency", "warning"),
    "empty conversations": (_set("conversations", []), "'conversations' is missing or empty", "error"),
    "no conversations key": (lambda entry, folder: entry.pop("conversations"), "'conversations' is missing", "error"),
    "conversations not a list": (_set("conversations", "hello"), "'conversations' is missing or empty", "error"),
    "turn without value": (_turns({"from": "human"}, REPLY), "turn 0 is not an object with string 'from' and 'value'",
                           "error"),
    "value not a string": (_turns({"from": "human", "value": 7}, REPLY), "turn 0 is not an object", "error"),
    "role user": (_turns({"from": "user", "value": "hi"}, REPLY), "roles ['user', 'gpt']", "error"),
    "roles not alternating": (_turns(QUESTION, QUESTION, REPLY), "roles ['human', 'human', 'gpt']", "error"),
    "ends with a human turn": (_turns(QUESTION, REPLY, QUESTION), "roles ['human', 'gpt', 'human']", "error"),
    "two image placeholders": (_turns({"from": "human", "value": "<image> and <image>"}, REPLY),
                               "2 <image> placeholders", "error"),
    "lone surrogate": (_turns({"from": "human", "value": "<image>\ncolour \ud800?"}, REPLY),
                       "turn 0: text is not valid Unicode (surrogates not allowed at character 15)", "error"),
    "no image key": (lambda entry, folder: entry.pop("image"), "no 'image': text-only samples", "error"),
    "image is a list": (_set("image", ["0.jpg", "2.jpg"]), "'image' must be one file name", "error"),
    "conversation beyond the positions": (_turns(QUESTION, {"from": "gpt", "value": LONG}),
                                          "longer than the model's positions, cut to its first 200 tokens", "warning"),
    "image placeholder beyond the positions": (_turns({"from": "human", "value": f"{LONG} <image>"}, REPLY),
                                               "the first 200 hold no image", "error"),
}


def _llava_set(root: Path, spoil=None, count: int = 4) -> Path:
    """``count`` good entries (id i, image i.jpg), entry 1 spoilt by ``spoil`` and given id "bad"."""
    entries = []
    for i in range(count):
        _picture(root / "img" / f"{i}.jpg")
        entries.append({"id": str(i), "image": f"{i}.jpg", "conversations": [QUESTION, REPLY]})
    if spoil is not None:
        entries[1]["id"] = "bad"
        spoil(entries[1], root / "img")
    path = root / "train.json"
    path.write_text(json.dumps(entries))
    return path


def _llava_data(root: Path, tokenizer_dir: Path, on_bad_sample: str = "skip", **kwargs) -> LlavaDataModule:
    return LlavaDataModule(str(root / "train.json"), str(root / "img"), str(tokenizer_dir), batch_size=4,
                           image_size=48, on_bad_sample=on_bad_sample, **kwargs)


@pytest.mark.parametrize("case", LLAVA_CASES)
def test_check_data_names_the_bad_entry(case, tmp_path, tokenizer_dir):
    spoil, what, severity = LLAVA_CASES[case]
    path = _llava_set(tmp_path, spoil)
    problems, sizes = check_splits(_llava_data(tmp_path, tokenizer_dir), LIMITS)
    assert sizes == {"train": 4}
    [problem] = problems
    assert (problem.where, problem.sample_id, problem.severity) == (f"{path} entry 1", "bad", severity)
    assert what in problem.what


ERRORS = [case for case, (_, _, severity) in LLAVA_CASES.items() if severity == "error"]


@pytest.mark.parametrize("case", ERRORS)
def test_skip_leaves_the_bad_sample_out_and_lists_it_error_stops_naming_it(case, tmp_path, tokenizer_dir):
    spoil, what, _ = LLAVA_CASES[case]
    path = _llava_set(tmp_path, spoil)
    data = _llava_data(tmp_path, tokenizer_dir)
    data.setup("fit")
    data.fit_to_model(LIMITS)
    [batch] = list(data.train_dataloader())
    assert sorted(batch["question_id"]) == ["0", "2", "3"]
    [problem] = [p.record() for p in data.problems["train"]] + batch["skipped"]
    assert problem["where"] == f"{path} entry 1" and problem["sample_id"] == "bad" and what in problem["what"]

    strict = _llava_data(tmp_path, tokenizer_dir, on_bad_sample="error")
    with pytest.raises(ValueError, match=r"entry 1 \(id bad\)") as error:  # at setup, or at the sample
        strict.setup("fit")
        strict.fit_to_model(LIMITS)
        list(strict.train_dataloader())
    assert what in str(error.value)


def test_long_conversation_is_cut_with_a_warning_and_a_long_prompt_is_a_bad_question(tmp_path, tokenizer_dir):
    _llava_set(tmp_path, _turns(QUESTION, {"from": "gpt", "value": LONG}))
    data = _llava_data(tmp_path, tokenizer_dir, test_json=str(tmp_path / "train.json"))
    data.setup(None)
    data.fit_to_model(LIMITS)
    with pytest.warns(UserWarning, match=r"entry 1 \(id bad\): the conversation is longer than the model's positions"):
        [batch] = list(data.train_dataloader())
    assert batch["input_ids"].shape[1] == LIMITS.max_length and len(batch["question_id"]) == 4

    _llava_set(tmp_path, _turns({"from": "human", "value": f"<image>\n{LONG}"}, REPLY))
    data = _llava_data(tmp_path, tokenizer_dir, test_json=str(tmp_path / "train.json"))
    data.setup("test")
    data.fit_to_model(LIMITS)
    [batch] = list(data.test_dataloader())
    assert batch["question_id"] == ["0", "2", "3"]
    assert "the prompt is" in batch["skipped"][0]["what"] and batch["skipped"][0]["sample_id"] == "bad"


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, tokenizer_dir):
    _llava_set(tmp_path)
    data = _llava_data(tmp_path, tokenizer_dir)
    small = SequenceLimits(vocab_size=64, max_length=200, max_prompt_length=190)
    with pytest.raises(ValueError, match=r"the tokenizer has 149 ids, the model's embedding 64.*tokenizer_path"):
        data.fit_to_model(small)
    [problem], _ = check_splits(data, small)
    assert problem.where == "data.init_args.tokenizer_path" and "149 ids" in problem.what


@pytest.mark.parametrize("content, message", [
    (b'[{"id": 1, "image": "0.jpg", "conversations": []}\xff]', r"not UTF-8 text: byte 0xff on line 1 \(byte 49\)"),
    (b'[{"id": 1,\n "image": "0.jpg",,}]', r"malformed JSON at line 2 column 19: Expecting property name"),
    (b'{"id": 1}', "expected a JSON list of samples, got dict"),
])
def test_unreadable_annotation_file_names_the_file_and_the_place(content, message, tmp_path, tokenizer_dir):
    (tmp_path / "img").mkdir()
    (tmp_path / "train.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"train.json: {message}"):
        _llava_data(tmp_path, tokenizer_dir).setup("fit")


def test_missing_annotation_file_names_it(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*train.json"):
        _llava_data(tmp_path, tokenizer_dir).setup("fit")


def test_error_policy_lists_every_bad_entry_at_setup(tmp_path, tokenizer_dir):
    path = _llava_set(tmp_path, count=6)
    entries = json.loads(path.read_text())
    entries[2]["conversations"], entries[4]["image"] = [], "gone.jpg"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"2 bad samples \(on_bad_sample: error\):\n.*entry 2 \(id 2\).*\n.*entry 4 \(id 4\)"):
        _llava_data(tmp_path, tokenizer_dir, on_bad_sample="error").setup("fit")


# --- benchmarks ----------------------------------------------------------------------------------

def _textvqa(root: Path, spoil) -> TextVQA:
    data = []
    for i in range(3):
        _picture(root / "images" / f"img{i}.jpg")
        data.append({"question_id": i, "image_id": f"img{i}", "question": "what is it?", "answers": ["stop"] * 10})
    spoil(data[1])
    (root / "textvqa.json").write_text(json.dumps({"data": data}))
    return TextVQA(str(root / "textvqa.json"), str(root / "images"))


TEXTVQA_CASES = {
    "answers a string": (lambda e: e.update(answers="blue"), "'answers' must be a list of strings, got 'blue'"),
    "answers empty": (lambda e: e.update(answers=[]), "'answers' is empty"),
    "answers not strings": (lambda e: e.update(answers=[1, 2]), "'answers' must be a list of strings, got [1, 2]"),
    "no question": (lambda e: e.pop("question"), "missing key 'question'"),
    "no image_id": (lambda e: e.pop("image_id"), "missing key 'image_id'"),
    "image missing": (lambda e: e.update(image_id="gone"), "image not found: "),
}


@pytest.mark.parametrize("case", TEXTVQA_CASES)
def test_textvqa_bad_question_is_named_and_left_out(case, tmp_path, tokenizer_dir):
    spoil, what = TEXTVQA_CASES[case]
    reader = _textvqa(tmp_path, spoil)
    data = BenchmarkDataModule(reader, str(tokenizer_dir), image_size=48)
    data.setup("test")
    [problem] = data.problems["test"]
    assert problem.where == f"{tmp_path / 'textvqa.json'} entry 1" and problem.sample_id == "1"
    assert what in problem.what
    assert data.splits["test"].sample_ids() == ["0", "2"]
    with pytest.raises(ValueError, match=r"textvqa.json entry 1 \(id 1\)"):
        BenchmarkDataModule(reader, str(tokenizer_dir), image_size=48, on_bad_sample="error").setup("test")


def test_max_image_pixels_makes_a_larger_image_a_bad_question(tmp_path, tokenizer_dir):
    reader = _textvqa(tmp_path, lambda e: None)
    _picture(tmp_path / "images" / "img1.jpg", (40, 30))  # 1,200 pixels; the others 24 x 16, 384
    what = "img1.jpg: 40 x 30 pixels, over the limit of 1000 (data.init_args.max_image_pixels)"
    data = BenchmarkDataModule(reader, str(tokenizer_dir), image_size=48, max_image_pixels=1000)
    [problem], _ = check_splits(data, LIMITS)
    assert problem.sample_id == "1" and what in problem.what
    data.setup("test")
    data.fit_to_model(LIMITS)
    [batch] = list(data.test_dataloader())
    assert batch["question_id"] == ["0", "2"] and what in batch["skipped"][0]["what"]
    strict = BenchmarkDataModule(reader, str(tokenizer_dir), image_size=48, max_image_pixels=1000,
                                 on_bad_sample="error")
    strict.setup("test")
    strict.fit_to_model(LIMITS)
    with pytest.raises(ValueError, match=r"textvqa.json entry 1 \(id 1\): image too large"):
        list(strict.test_dataloader())


def test_answers_of_a_string_never_reach_scoring_as_characters(tmp_path, tokenizer_dir):
    """Even from a reader of one's own: the collator refuses answers that are not a list of strings."""
    data = BenchmarkDataModule(_textvqa(tmp_path, lambda e: None), str(tokenizer_dir), image_size=48)
    sample = {"question": "<image>\nwhat?", "answers": "blue", "question_id": "q", "where": "mine.json entry 3"}
    with pytest.raises(BadSample, match=r"mine.json entry 3 \(id q\): 'answers' must be a list of strings"):
        data.collator.encode(sample)


@pytest.mark.parametrize("reader, what", [
    (lambda root: MagnifierBench(str(_write(root / "m.json", [{"id": "m1", "image": "a.jpg", "question": "Q?",
                                                              "options": "red", "answer": "A"}]))),
     "m.json entry 0 (id m1): 'options' must be a list of strings, got 'red'"),
    (lambda root: LlavaQuestions(str(_write(root / "q.jsonl", '{"question_id": 4, "image": "a.jpg"}\n')), str(root)),
     "q.jsonl line 1 (id 4): missing key 'text'"),
    (lambda root: VStar(str(_vstar_with_options(root, "red"))),
     "sa_1.json (id direct_attributes/sa_1): 'options' must be a list of strings"),
])
def test_other_benchmarks_name_the_bad_entry(reader, what, tmp_path):
    _, [problem] = reader(tmp_path).read()
    assert what in str(problem)


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _vstar_with_options(root: Path, options) -> Path:
    for subset in ("direct_attributes", "relative_position"):
        (root / subset).mkdir()
    _picture(root / "direct_attributes" / "sa_1.jpg")
    _write(root / "direct_attributes" / "sa_1.json", {"question": "Which?", "options": options})
    return root


def test_check_data_on_a_benchmark_reports_reader_and_image_problems(tmp_path, tokenizer_dir):
    reader = _textvqa(tmp_path, lambda e: e.update(answers="blue"))
    _damage(tmp_path / "images" / "img2.jpg", "text")
    data = BenchmarkDataModule(reader, str(tokenizer_dir), image_size=48)
    problems, sizes = check_splits(data, LIMITS)
    assert sizes == {"test": 3}
    assert [(p.sample_id, p.what.split(":")[0]) for p in problems] == [
        ("1", "'answers' must be a list of strings, got 'blue'"), ("2", "cannot decode image " + str(
            tmp_path / "images" / "img2.jpg"))]


def test_tokenizer_fixture_is_what_the_limits_assume(tokenizer_dir):
    assert load_tokenizer(tokenizer_dir).vocab_size == 149 < LIMITS.vocab_size


# --- ids shared by two samples -------------------------------------------------------------------

def _questions_with_a_shared_id(root: Path) -> LlavaQuestions:
    """Four questions, the first and the third with id 7."""
    for name in ("a.jpg", "b.jpg"):
        _picture(root / name)
    lines = [{"question_id": qid, "image": "a.jpg", "text": "What is it?", "answer": "a cat"} for qid in (7, 8, 7, 9)]
    _write(root / "q.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    return LlavaQuestions(str(root / "q.jsonl"), str(root))


@pytest.mark.parametrize("on_bad_sample", ["skip", "error"])
def test_evaluation_refuses_questions_that_share_an_id_at_setup(on_bad_sample, tmp_path, tokenizer_dir):
    """answers.jsonl and a restarted test know a question by its id: of the two, one would be lost."""
    data = BenchmarkDataModule(_questions_with_a_shared_id(tmp_path), str(tokenizer_dir), image_size=48,
                               on_bad_sample=on_bad_sample)
    with pytest.raises(ValueError, match=r"the test split has 1 questions with the id of an earlier one.*\n"
                                         r".*q.jsonl line 3 \(id 7\): .*q.jsonl line 1 has the same id"):
        data.setup("test")


def test_check_data_names_a_shared_id_and_both_entries(tmp_path, tokenizer_dir):
    data = BenchmarkDataModule(_questions_with_a_shared_id(tmp_path), str(tokenizer_dir), image_size=48)
    [problem], sizes = check_splits(data, LIMITS)
    assert sizes == {"test": 4}
    assert (problem.where, problem.sample_id, problem.severity) == (f"{tmp_path / 'q.jsonl'} line 3", "7", "error")
    assert problem.what == f"{tmp_path / 'q.jsonl'} line 1 has the same id"


def test_a_shared_id_in_training_data_is_a_warning_and_both_samples_train(tmp_path, tokenizer_dir):
    """LLaVA-style training sets share ids between conversations about one image: ids only name them."""
    path = _llava_set(tmp_path)
    entries = json.loads(path.read_text())
    entries[3]["id"] = "1"
    path.write_text(json.dumps(entries))
    data = _llava_data(tmp_path, tokenizer_dir, test_json=str(path))
    problems, _ = check_splits(data, LIMITS)
    assert [(p.where, p.sample_id, p.severity) for p in problems] == [
        (f"{path} entry 3", "1", "warning"), (f"{path} entry 3", "1", "error")]  # train, then test
    data.setup("fit")
    data.fit_to_model(LIMITS)
    [batch] = list(data.train_dataloader())
    assert sorted(batch["question_id"]) == ["0", "1", "1", "2"]
    with pytest.raises(ValueError, match=r"entry 3 \(id 1\): .*train.json entry 1 has the same id"):
        data.setup("test")
