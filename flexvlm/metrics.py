"""Evaluation metrics of the paper's benchmarks, as torchmetrics ``Metric``s (DDP-safe: every state
is a tensor summed across processes).

- ``VQAAccuracy``: TextVQA soft accuracy over the reference answers.
- ``ExactMatchAccuracy``: normalised strings equal.
- ``MultipleChoiceAccuracy``: MagnifierBench, a letter parsed from a generated response.
- ``LikelihoodChoiceAccuracy``: V* Bench, the option with the lowest answer cross-entropy.
- ``YesNoAccuracy``: RSVQA-HRBEN, accuracy per question type and their mean.
"""

import re
import string

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from flexvlm.constants import IGNORE_INDEX

# --- The EvalAI answer processor (TextVQA / VQA challenge servers, m4c_evaluator.py) ---

# Official table, verbatim. Its capitalised keys ("Im", "Ive", ...) never match because the text is
# lower-cased first, and "somebody'd" maps to "somebodyd": both quirks are the official behaviour.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Official order. "," and "?" are listed too, but the first step has already deleted them.
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its look-behind is misspelt as a look-ahead, so
# it strips every period not followed by a digit ("3.5" keeps its period, "3." and "u.s." lose it).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official call is `sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as the count.
_PERIOD_STRIP_COUNT = 32


def _process_punctuation(text: str) -> str:
    # A mark touching a space is dropped, one inside a word becomes a space ("coca-cola" ->
    # "coca cola"); the test looks at the whole input, not the text rewritten so far.
    # The official processor also drops every mark when a comma sits between two digits, but
    # normalize_answer has deleted all commas before this point, so that rule can never fire.
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(s: str) -> str:
    """The EvalAI answer processor (TextVQA/VQA servers, m4c_evaluator.EvalAIAnswerProcessor).

    Lower-cases, deletes "," and "?", splits "'s" off ("man's" -> "man 's"), turns newlines and
    tabs into spaces, handles punctuation and periods, maps number words to digits ("none" -> "0"),
    drops articles and restores contractions ("dont" -> "don't").
    """
    s = s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_soft_score(pred: str, references: list[str]) -> float:
    """VQA accuracy of one prediction, both sides normalised.

    With n >= 2 references: the mean over the n leave-one-out subsets (reference j left out) of
    min(1, matches in the subset / 3); with 10 references and k matches this gives 0.3, 0.6, 0.9,
    1.0 for k = 1..4. With a single reference leave-one-out would leave nothing to match, so the
    score is exact match of the normalised strings.
    """
    if not references:
        raise ValueError("a VQA question needs at least one reference answer")
    pred = normalize_answer(pred)
    hits = [normalize_answer(r) == pred for r in references]
    if len(hits) == 1:
        return float(hits[0])
    matches = sum(hits)
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)


# --- Multiple choice ------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
# Tried in order; the letter must be upper case (but for a response that is only a letter), the
# keyword may be in any case.
_LETTER_PATTERNS = [
    re.compile(r"^\W*([A-Za-z])\W*$"),  # the whole response: "B", "b.", "(B)", "**B**"
    re.compile(r"\b(?i:answer|option|choice)\b\W*(?:(?i:is)\W*)?([A-Z])\b"),  # "Answer: B"
    re.compile(r"\(([A-Z])\)"),  # "(B) red", "it is (B)"
    re.compile(r"^\s*([A-Z])[.:)](?:\s|$)"),  # "B. red", "B) red"
    re.compile(r"\b([A-Z])\W*$"),  # the last word: "I think it is B."
]


def parse_choice_letter(text: str, options: list[str]) -> int | None:
    """Index of the option a free-form response picks, or None (MagnifierBench-style parsing).

    1. a standalone letter of a valid option, in the forms of ``_LETTER_PATTERNS``;
    2. else the first character of the response, if it is a valid option letter (so "A cat"
       reads as A: the protocol's rule, which assumes the model answers with a letter);
    3. else the option whose text the response contains (case-insensitive), ignoring options
       contained in another contained one ("dark red" beats "red"); several left give None.
    """
    valid = _LETTERS[: len(options)]
    for pattern in _LETTER_PATTERNS:
        for match in pattern.finditer(text):
            if match.group(1).upper() in valid:
                return valid.index(match.group(1).upper())
    first = text.lstrip()[:1]
    if first and first in valid:
        return valid.index(first)
    texts = [o.strip().lower() for o in options]
    contained = [i for i, o in enumerate(texts) if o and o in text.lower()]
    widest = [i for i in contained if not any(j != i and texts[i] in texts[j] for j in contained)]
    return widest[0] if len(widest) == 1 else None


def mean_answer_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                              ) -> Tensor:
    """Mean token cross-entropy of each sequence's labelled tokens, shape (B,).

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned as the model returns them: the causal
    shift is applied here (logits[:, :-1] predict labels[:, 1:]). Mask everything but the answer
    with ``ignore_index``; a sequence with no answer token is an error. Computed in float32.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index,
                                 reduction="none")
    counts = (labels != ignore_index).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a sequence has no answer token (all its shifted labels are ignored)")
    return token_loss.sum(dim=1) / counts


# --- Metrics --------------------------------------------------------------------------------


class _MeanScore(Metric):
    """Mean of per-item scores: a summed score and a count, so DDP reduction is a plain sum."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def add(self, scores: Tensor | list[float]) -> None:
        """Per-item scores as they are (e.g. those of answers a restarted evaluation had written)."""
        scores = torch.as_tensor(scores, dtype=torch.float64, device=self.score_sum.device)
        self.score_sum += scores.sum()
        self.total += scores.numel()

    def compute(self) -> Tensor:
        return self.score_sum / self.total


class VQAAccuracy(_MeanScore):
    """TextVQA / VQA soft accuracy (see ``vqa_soft_score``), averaged over questions."""

    def update(self, preds: list[str], targets: list[list[str]]) -> None:
        self.add([vqa_soft_score(p, refs) for p, refs in zip(preds, targets, strict=True)])


def exact_match(pred: str, target: str) -> bool:
    """Equal after ``normalize_answer``."""
    return normalize_answer(pred) == normalize_answer(target)


class ExactMatchAccuracy(_MeanScore):
    """Fraction of predictions equal to their target after ``normalize_answer``."""

    def update(self, preds: list[str], targets: list[str]) -> None:
        self.add([exact_match(p, t) for p, t in zip(preds, targets, strict=True)])


class MultipleChoiceAccuracy(_MeanScore):
    """Accuracy of letters parsed from responses (``parse_choice_letter``); unparsed is wrong."""

    def update(self, responses: list[str], options: list[list[str]], answers: list[int]) -> None:
        self.add([parse_choice_letter(r, o) == a
                   for r, o, a in zip(responses, options, answers, strict=True)])


class LikelihoodChoiceAccuracy(_MeanScore):
    """V* Bench: the option with the lowest mean answer cross-entropy is the prediction.

    ``option_losses`` is (B, n_options); pad missing options of shorter rows with +inf.
    """

    def update(self, option_losses: Tensor, answers: Tensor) -> None:
        self.add(option_losses.argmin(dim=-1) == answers.to(option_losses.device))


_YES_NO = {"yes", "no"}


def yes_no_correct(pred: str, target: str) -> bool:
    """RSVQA scoring of one answer."""
    # Yes/no targets compare the first word of the normalised response ("Yes, there is." ->
    # "yes"); any other target (count, area) needs the whole normalised answer ("three" == "3").
    pred, target = normalize_answer(pred), normalize_answer(target)
    if target in _YES_NO:
        return pred.split(" ", 1)[0] == target
    return pred == target


class YesNoAccuracy(Metric):
    """RSVQA-HRBEN: accuracy per question type and their unweighted mean.

    ``compute`` returns {type: accuracy for each type seen, "average": mean of those}. The types
    are fixed at construction because DDP needs the same states on every process.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, qtypes: tuple[str, ...] = ("presence", "comparison", "count", "area"),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if "average" in qtypes:
            raise ValueError("'average' is reserved for the mean over question types")
        self.qtypes = tuple(qtypes)
        n = len(self.qtypes)
        self.add_state("correct", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str], qtypes: list[str]) -> None:
        self.add([yes_no_correct(p, t) for p, t in zip(preds, targets, strict=True)], qtypes)

    def add(self, outcomes: list[bool], qtypes: list[str]) -> None:
        """Outcomes as they are (e.g. those of answers a restarted evaluation had written)."""
        correct, total = [0] * len(self.qtypes), [0] * len(self.qtypes)
        for outcome, qtype in zip(outcomes, qtypes, strict=True):
            if qtype not in self.qtypes:
                raise ValueError(f"unknown question type {qtype!r}; expected one of {self.qtypes}")
            i = self.qtypes.index(qtype)
            correct[i] += bool(outcome)
            total[i] += 1
        self.correct += torch.tensor(correct, device=self.correct.device)
        self.total += torch.tensor(total, device=self.total.device)

    def compute(self) -> dict[str, Tensor]:
        seen = [i for i, n in enumerate(self.total.tolist()) if n > 0]
        acc = self.correct.double() / self.total.clamp(min=1)
        result = {self.qtypes[i]: acc[i] for i in seen}
        result["average"] = acc[seen].mean()  # NaN before any update
        return result
