"""Metrics against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from flexvlm.metrics import (
    ExactMatchAccuracy,
    LikelihoodChoiceAccuracy,
    MultipleChoiceAccuracy,
    VQAAccuracy,
    YesNoAccuracy,
    mean_answer_cross_entropy,
    normalize_answer,
    parse_choice_letter,
    vqa_soft_score,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("Yes", "yes"),
    ("  Stop  ", "stop"),
    ("Two", "2"),
    ("none", "0"),
    ("None.", "0"),
    ("ten apples", "10 apples"),
    ("The Cat", "cat"),
    ("an apple a day", "apple day"),
    ("the_end", "end"),  # "_" inside a word -> space, then the article goes
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("cant", "can't"),
    ("can't", "can't"),
    ("Im", "im"),  # the official table's capitalised keys never match
    ("somebody'd", "somebodyd"),  # the official table's reversed entry
    ("man's hat", "man 's hat"),
    ("1,000", "1000"),
    ("3.14", "3.14"),  # a period before a digit stays
    ("3.", "3"),
    ("u.s.a.", "usa"),
    ("What?", "what"),
    ("Hello!", "hello"),
    ("coca-cola", "coca cola"),
    ("hello - world", "hello world"),
    ("well-known - fact", "wellknown fact"),  # a mark touching a space anywhere drops them all
    ("1/2", "1 2"),
    ("(b)", "b"),
    ("@home", "home"),
    ('say "hi"', "say hi"),
    ("Line1\nLine2\tend", "line1 line2 end"),
    ("." * 33 + "x", ".x"),  # the official period strip stops after 32 replacements
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                                   (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_ten_references(matches, expected):
    refs = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_soft_score("cat", refs) == pytest.approx(expected)


def test_vqa_soft_score_normalises_both_sides_and_few_references():
    assert vqa_soft_score("Two.", ["2", "two", "the 2"] + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_soft_score("The Cat", ["cat"]) == 1.0  # a single reference: exact match
    assert vqa_soft_score("dog", ["cat"]) == 0.0
    # two references, one match: (0 + 1/3) / 2
    assert vqa_soft_score("cat", ["cat", "dog"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        vqa_soft_score("cat", [])


def test_vqa_accuracy_metric_and_merge():
    refs = [["cat"] * 2 + ["dog"] * 8, ["yes"] * 10, ["a"]]
    preds = ["cat", "no", "A"]  # 0.6, 0, and "a" normalises to "" on both sides: 1
    metric = VQAAccuracy()
    metric.update(preds, refs)
    assert metric.compute().item() == pytest.approx(1.6 / 3)
    # Two processes' states summed, as DDP does, give the same mean.
    first, second = VQAAccuracy(), VQAAccuracy()
    first.update(preds[:1], refs[:1])
    second.update(preds[1:], refs[1:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(1.6 / 3)
    with pytest.raises(ValueError):
        metric.update(["x"], [])


def test_exact_match_accuracy():
    metric = ExactMatchAccuracy()
    metric.update(["The Dog.", "three", "cat"], ["dog", "3", "cats"])
    assert metric.compute().item() == pytest.approx(2 / 3)


OPTIONS = ["red", "blue", "dark red", "green"]


@pytest.mark.parametrize(("text", "expected"), [
    ("B", 1), ("b", 1), ("B.", 1), ("(B)", 1), ("**C**", 2), ("Answer: B", 1),
    ("The answer is (C).", 2), ("The correct option is D", 3), ("(C) dark red", 2),
    ("B. blue", 1), ("D) green", 3), ("I think it is D.", 3),
    ("E", None),  # not an option: falls through, and "E" is no option text
    ("A cat", 0),  # the first-letter rule
    ("blue", 1), ("It is dark red.", 2),  # option text; "dark red" beats "red"
    ("red or blue", None), ("purple", None), ("", None),
])
def test_parse_choice_letter(text, expected):
    assert parse_choice_letter(text, OPTIONS) == expected


def test_multiple_choice_accuracy():
    metric = MultipleChoiceAccuracy()
    metric.update(["B", "the answer is A", "purple"], [OPTIONS] * 3, [1, 2, 0])
    assert metric.compute().item() == pytest.approx(1 / 3)


def test_mean_answer_cross_entropy_applies_the_shift():
    vocab = 5
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, 4, -100]])
    logits = torch.full((2, 4, vocab), -20.0)
    for b in range(2):
        for t in range(3):  # position t predicts label t + 1
            if labels[b, t + 1] >= 0:
                logits[b, t, labels[b, t + 1]] = 20.0
    loss = mean_answer_cross_entropy(logits, labels)
    assert loss.shape == (2,)
    assert torch.all(loss < 1e-6)
    # Uniform logits: every answer token costs log(V).
    uniform = mean_answer_cross_entropy(torch.zeros(2, 4, vocab), labels)
    assert torch.allclose(uniform, torch.full((2,), math.log(vocab)))


def test_mean_answer_cross_entropy_matches_per_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 7)
    labels = torch.tensor([[-100, -100, 1, 2, 3, -100]])
    expected = F.cross_entropy(logits[0, 1:4], labels[0, 2:5])
    assert mean_answer_cross_entropy(logits, labels).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError):
        mean_answer_cross_entropy(logits, torch.full((1, 6), -100))


def test_likelihood_choice_accuracy_with_padding():
    inf = float("inf")
    losses = torch.tensor([[0.5, 1.0, 2.0, 3.0], [2.0, 1.0, inf, inf], [0.2, 0.1, 0.9, 0.3]])
    metric = LikelihoodChoiceAccuracy()
    metric.update(losses, torch.tensor([0, 0, 1]))
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_yes_no_accuracy_per_type_and_average():
    metric = YesNoAccuracy()
    metric.update(
        ["Yes.", "no", "yes", "No, there is not.", "3", "three", "3 buildings"],
        ["yes", "yes", "no", "no", "3", "3", "3"],
        ["presence", "presence", "comparison", "comparison", "count", "count", "count"],
    )
    result = metric.compute()
    assert set(result) == {"presence", "comparison", "count", "average"}  # "area" unseen
    assert result["presence"].item() == pytest.approx(0.5)
    assert result["comparison"].item() == pytest.approx(0.5)
    assert result["count"].item() == pytest.approx(2 / 3)
    assert result["average"].item() == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        metric.update(["yes"], ["yes"], ["rural_urban"])


def test_yes_no_accuracy_merge_and_empty():
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(YesNoAccuracy(qtypes=("presence",)).compute()["average"].item())
    first, second = YesNoAccuracy(), YesNoAccuracy()
    first.update(["yes"], ["yes"], ["presence"])
    second.update(["no", "no"], ["yes", "no"], ["presence", "comparison"])
    first.merge_state(second)
    result = first.compute()
    assert result["presence"].item() == pytest.approx(0.5)
    assert result["comparison"].item() == pytest.approx(1.0)
    assert result["average"].item() == pytest.approx(0.75)
