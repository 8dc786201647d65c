"""Readers of the evaluation sets, one class each with typed arguments (a config names one under
``data.init_args.benchmark``), giving ``BenchmarkItem``s; a Dataset over them.

``read()`` returns the items and the ``Problem``s of the entries it left out (a missing key, answers
that are not a list of strings, ...), each named by file and entry index or line; a file that
cannot be read at all is an error. Prompts follow the evaluation protocols (docs/method.md,
section 8); each starts with the image placeholder as LLaVA does: "<image>\\n...".
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from flexvlm.constants import IMAGE_PLACEHOLDER
from flexvlm.data.files import parse_json, read_json, read_text
from flexvlm.data.problems import BadSample, Problem
from flexvlm.evaluation import EvaluationProtocol, GenerationVQA, LetterChoice, LikelihoodChoice, YesNo

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
LETTER_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VSTAR_SUBSETS = ("direct_attributes", "relative_position")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_RSVQA_IMAGE_SUFFIXES = (".tif", ".png")  # the release ships .tif; converted copies are .png
_RSVQA_QTYPES = {"comp": "comparison"}  # the release's names -> the names papers report


@dataclass
class BenchmarkItem:
    """One evaluation question. ``options``/``answer_index`` are set for multiple choice only;
    ``where`` is its file and entry, for messages."""

    question_id: str
    image_path: str
    prompt: str
    answers: list[str]
    options: list[str] | None = None
    answer_index: int | None = None
    qtype: str | None = None
    where: str = ""


Read = tuple[list[BenchmarkItem], list[Problem]]


class BenchmarkReader(ABC):
    """An evaluation set: how to read it, and the protocol that scores it by default."""

    @abstractmethod
    def read(self) -> Read:
        """The items, and the problems of the entries left out."""

    @abstractmethod
    def protocol(self) -> EvaluationProtocol:
        """The benchmark's own scoring (docs/method.md, section 8)."""


# --- Helpers --------------------------------------------------------------------------------


def _with_image(text: str) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{text}"


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _entry_id(entry: Any, keys: Sequence[str]) -> str | None:
    if isinstance(entry, dict):
        for key in keys:
            if key in entry:
                return str(entry[key])
    return None


def _bad(where: str, sample_id: str | None, what: str) -> BadSample:
    return BadSample(Problem(where, sample_id, what, "fix or remove the entry"))


def _field(entry: Any, keys: Sequence[str], where: str, sample_id: str | None = None) -> Any:
    """The value of the first of ``keys`` in ``entry``; a bad sample naming them all if none is."""
    if not isinstance(entry, dict):
        raise _bad(where, None, f"expected a JSON object, got {type(entry).__name__}")
    for key in keys:
        if key in entry:
            return entry[key]
    raise _bad(where, sample_id, f"missing key {' / '.join(repr(k) for k in keys)}")


def _strings(value: Any, key: str, where: str, sample_id: str | None) -> list[str]:
    """A non-empty list of strings (reference answers, options); anything else is a bad sample (a
    string would otherwise be read as its characters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(where, sample_id, f"{key!r} must be a list of strings, got {value!r:.80}")
    if not value:
        raise _bad(where, sample_id, f"{key!r} is empty")
    return value


def _list_field(data: Any, key: str, path: Path) -> list:
    """A top-level list of the file; without it the file is unreadable, not one entry."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON object with a list {key!r}")
    return value


def _parse_each(entries: Iterable[tuple[str, Any]], parse: Callable[[str, Any], BenchmarkItem | None]) -> Read:
    """Each (where, entry) parsed (None: not wanted), a bad one recorded instead."""
    items, problems = [], []
    for where, entry in entries:
        try:
            item = parse(where, entry)
        except BadSample as bad:
            problems.append(bad.problem)
            continue
        if item is not None:
            item.where = where
            items.append(item)
    return items, problems


def _numbered(entries: list, path: Path) -> Iterator[tuple[str, Any]]:
    return ((f"{path} entry {i}", entry) for i, entry in enumerate(entries))


# --- TextVQA --------------------------------------------------------------------------------


class TextVQA(BenchmarkReader):
    """TextVQA val: ``{"data": [{"question_id", "image_id", "question", "answers"}]}`` and
    ``{image_dir}/{image_id}.jpg``; scored with ``VQAAccuracy`` against the 10 answers."""

    def __init__(self, annotation_file: str, image_dir: str) -> None:
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)

    def read(self) -> Read:
        path = self.annotation_file
        image_dir = _existing(self.image_dir, "TextVQA image folder")
        data = _list_field(read_json(path, "TextVQA annotations"), "data", path)

        def parse(where: str, entry: Any) -> BenchmarkItem:
            qid = _entry_id(entry, ["question_id"])
            question = _field(entry, ["question"], where, qid)
            return BenchmarkItem(
                question_id=str(_field(entry, ["question_id"], where)),
                image_path=str(image_dir / f"{_field(entry, ['image_id'], where, qid)}.jpg"),
                prompt=_with_image(f"{question}\n{SHORT_ANSWER_INSTRUCTION}"),
                answers=_strings(_field(entry, ["answers"], where, qid), "answers", where, qid),
            )

        return _parse_each(_numbered(data, path), parse)

    def protocol(self) -> EvaluationProtocol:
        return GenerationVQA()


# --- V* Bench -------------------------------------------------------------------------------


class VStar(BenchmarkReader):
    """V* Bench: ``{root}/{subset}/x.jpg`` with ``x.json`` holding ``question`` and ``options``.

    Scored by likelihood: the prompt is "<image>\\n{question}" with no instruction, and each
    option is a candidate answer. The release lists the correct option first: ``answer_index``
    is 0.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _images(self) -> Iterator[tuple[str, tuple[str, Path]]]:
        root = _existing(self.root, "V* Bench folder")
        for subset in VSTAR_SUBSETS:
            folder = _existing(root / subset, "V* Bench subset folder")
            for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
                yield str(image.with_suffix(".json")), (subset, image)

    def read(self) -> Read:
        def parse(where: str, found: tuple[str, Path]) -> BenchmarkItem:
            subset, image = found
            qid = f"{subset}/{image.stem}"
            try:  # each question has a file of its own: one that cannot be read is one bad question
                annotation = read_json(where, "V* Bench annotation")
            except (FileNotFoundError, ValueError) as err:
                raise _bad(where, qid, str(err)) from err
            options = _strings(_field(annotation, ["options"], where, qid), "options", where, qid)
            return BenchmarkItem(
                question_id=qid,
                image_path=str(image),
                prompt=_with_image(_field(annotation, ["question"], where, qid)),
                answers=[options[0]],
                options=options,
                answer_index=0,
                qtype=subset,
            )

        return _parse_each(self._images(), parse)

    def protocol(self) -> EvaluationProtocol:
        return LikelihoodChoice()


# --- MagnifierBench -------------------------------------------------------------------------


def _split_inline_options(text: str) -> tuple[str, list[str]]:
    """'Is it red? A. yes, B. no' -> ('Is it red?', ['yes', 'no']): the official release keeps the
    options inside the instruction. Letters must follow in order from A; none -> (text, [])."""
    starts = []
    for letter in string.ascii_uppercase:
        marker = f" {letter}. "
        at = text.find(marker, starts[-1] + len(marker) if starts else 0)
        if at < 0:
            break
        starts.append(at)
    if not starts:
        return text, []
    ends = starts[1:] + [len(text)]
    options = [text[s + 4:e].strip().rstrip(",.").strip() for s, e in zip(starts, ends)]
    return text[:starts[0]].strip(), options


def _answer_index(answer: Any, options: list[str], where: str, sample_id: str | None) -> int:
    # The answer may be an index, a letter ("B") or the option's text.
    if isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        letters = string.ascii_uppercase[: len(options)]
        if len(text) == 1 and text.upper() in letters:
            return letters.index(text.upper())
        lowered = [o.strip().lower() for o in options]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    raise _bad(where, sample_id, f"answer {answer!r} matches none of the options {options}")


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The letter-answer prompt: the question, "A. ..." lines, then the instruction."""
    lines = [question, *(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))]
    return _with_image("\n".join([*lines, LETTER_ANSWER_INSTRUCTION]))


class MagnifierBench(BenchmarkReader):
    """MagnifierBench: a JSON list of entries with ``id`` (or ``question_id``), ``image`` (or
    ``image_path``, or ``images``: a list whose first is used), ``question`` (or ``instruction``),
    ``options`` (or ``choices``; else parsed from "... A. x, B. y" in the question, as the release
    writes them) and ``answer`` (a letter, an index or the option's text). Image paths are
    relative to ``image_root``, by default the annotation file's folder."""

    def __init__(self, annotation_file: str, image_root: str | None = None) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root) if image_root is not None else self.annotation_file.parent

    def read(self) -> Read:
        path = self.annotation_file
        data = read_json(path, "MagnifierBench annotations")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of questions")

        def parse(where: str, entry: Any) -> BenchmarkItem:
            qid = _entry_id(entry, ["id", "question_id"])
            question = _field(entry, ["question", "instruction"], where, qid)
            if "options" in entry or "choices" in entry:
                options = _strings(_field(entry, ["options", "choices"], where, qid), "options", where, qid)
            else:
                question, options = _split_inline_options(question)
            if not options:
                raise _bad(where, qid, "missing key 'options' / 'choices', and no 'A. ...' options in the question")
            image = _field(entry, ["image", "image_path", "images"], where, qid)
            image = image[0] if isinstance(image, list) and image else image
            if not isinstance(image, str):
                raise _bad(where, qid, f"the image must be a file name, got {image!r:.80}")
            answer_index = _answer_index(_field(entry, ["answer"], where, qid), options, where, qid)
            return BenchmarkItem(
                question_id=str(_field(entry, ["id", "question_id"], where)),
                image_path=str(self.image_root / image),
                prompt=multiple_choice_prompt(question, options),
                answers=[string.ascii_uppercase[answer_index]],
                options=options,
                answer_index=answer_index,
            )

        return _parse_each(_numbered(data, path), parse)

    def protocol(self) -> EvaluationProtocol:
        return LetterChoice()


# --- RSVQA-HRBEN ----------------------------------------------------------------------------


def _active(entries: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The entries not marked ``"active": false`` (a non-object is kept, to be reported)."""
    return ((where, e) for where, e in entries if not isinstance(e, dict) or e.get("active", True))


def _rsvqa_image(image_dir: Path, img_id: Any) -> Path | None:
    for suffix in _RSVQA_IMAGE_SUFFIXES:
        candidate = image_dir / f"{img_id}{suffix}"
        if candidate.exists():
            return candidate
    return None


class RSVQAHR(BenchmarkReader):
    """RSVQA-HRBEN as released: ``{root}/USGS_split_{split}_questions.json``
    (``{"questions": [{"id", "img_id", "question", "type", "answers_ids", "active"}]}``),
    ``USGS_split_{split}_answers.json`` (``{"answers": [{"id", "answer", "question_id",
    "active"}]}``) and ``{root}/Data/{img_id}.tif`` (or ``.png``).

    ``split`` is "test" (test set 1) or "test_phili" (test set 2). Inactive questions and answers
    are dropped, as in the release's own loader. The type "comp" is reported as "comparison";
    ``qtypes`` keeps those types (the paper's protocol: presence and comparison), None keeps all.
    """

    def __init__(self, root: str, split: str = "test",
                 qtypes: tuple[str, ...] | None = ("presence", "comparison")) -> None:
        self.root, self.split, self.qtypes = Path(root), split, qtypes

    def read(self) -> Read:
        root = _existing(self.root, "RSVQA-HR folder")
        q_path = root / f"USGS_split_{self.split}_questions.json"
        a_path = root / f"USGS_split_{self.split}_answers.json"
        questions = _list_field(read_json(q_path, "RSVQA questions"), "questions", q_path)
        answers = _list_field(read_json(a_path, "RSVQA answers"), "answers", a_path)
        image_dir = _existing(root / "Data", "RSVQA image folder")
        keep = None if self.qtypes is None else set(self.qtypes)

        def answer(where: str, entry: Any) -> tuple[Any, Any]:
            return _field(entry, ["id"], where), _field(entry, ["answer"], where)

        answer_by_id, problems = {}, []
        for where, entry in _active(_numbered(answers, a_path)):
            try:
                key, value = answer(where, entry)
                answer_by_id[key] = value
            except BadSample as bad:
                problems.append(bad.problem)

        def parse(where: str, q: Any) -> BenchmarkItem | None:
            qid = _entry_id(q, ["id"])
            qtype = _field(q, ["type"], where, qid)
            qtype = _RSVQA_QTYPES.get(qtype, qtype)
            if keep is not None and qtype not in keep:
                return None
            refs = [answer_by_id[a] for a in _field(q, ["answers_ids"], where, qid) if a in answer_by_id]
            if not refs:
                raise _bad(where, qid, "no active answer among answers_ids")
            img_id = _field(q, ["img_id"], where, qid)
            image = _rsvqa_image(image_dir, img_id)
            if image is None:  # named with both suffixes tried; the datamodule reports it as missing
                image = image_dir / f"{img_id}{{{','.join(_RSVQA_IMAGE_SUFFIXES)}}}"
            return BenchmarkItem(
                question_id=str(_field(q, ["id"], where)),
                image_path=str(image),
                prompt=_with_image(f"{_field(q, ['question'], where, qid)}\n{SHORT_ANSWER_INSTRUCTION}"),
                answers=_strings(refs, "answers", where, qid),
                qtype=qtype,
            )

        items, question_problems = _parse_each(_active(_numbered(questions, q_path)), parse)
        return items, problems + question_problems

    def protocol(self) -> EvaluationProtocol:
        return YesNo()


# --- LLaVA question files -------------------------------------------------------------------


class LlavaQuestions(BenchmarkReader):
    """A LLaVA-style ``.jsonl`` of ``{"question_id", "image", "text"}`` with optional ``answer`` or
    ``answers`` and ``category`` (kept as ``qtype``). The text is used as is (these files carry
    their instruction), behind "<image>\\n" unless it already holds the placeholder. Scored by VQA
    accuracy against the answers given."""

    def __init__(self, question_file: str, image_dir: str) -> None:
        self.question_file, self.image_dir = Path(question_file), Path(image_dir)

    def read(self) -> Read:
        path = self.question_file
        lines = read_text(path, "question file").splitlines()
        numbered = ((f"{path} line {n}", line) for n, line in enumerate(lines, start=1) if line.strip())

        def parse(where: str, line: str) -> BenchmarkItem:
            try:
                entry = parse_json(line, where)
            except ValueError as err:
                raise _bad(where, None, str(err).removeprefix(f"{where}: ")) from err
            qid = _entry_id(entry, ["question_id"])
            text = _field(entry, ["text"], where, qid)
            answers = entry.get("answers", [entry["answer"]] if "answer" in entry else [])
            if answers:
                answers = _strings(answers, "answers", where, qid)
            return BenchmarkItem(
                question_id=str(_field(entry, ["question_id"], where)),
                image_path=str(self.image_dir / _field(entry, ["image"], where, qid)),
                prompt=text if IMAGE_PLACEHOLDER in text else _with_image(text),
                answers=answers,
                qtype=entry.get("category"),
            )

        return _parse_each(numbered, parse)

    def protocol(self) -> EvaluationProtocol:
        return GenerationVQA()


# --- Dataset --------------------------------------------------------------------------------


class BenchmarkDataset(Dataset):
    """Items plus their images, loaded lazily by ``image_loader(path) -> dict`` (for example
    ``flexvlm.data.image`` preprocessing); each sample is the item's fields and the loader's. An
    image that fails to load is a ``BadSample`` naming the question. ``problems``: those of the
    entries left out before (the reader's, missing images)."""

    def __init__(self, items: Sequence[BenchmarkItem], image_loader: Callable[[str], dict[str, Any]],
                 problems: Sequence[Problem] = ()) -> None:
        self.items = list(items)
        self.image_loader = image_loader
        self.problems = list(problems)

    def __len__(self) -> int:
        return len(self.items)

    def sample_ids(self) -> list[str]:
        return [item.question_id for item in self.items]

    def image_path(self, index: int) -> Path:
        return Path(self.items[index].image_path)

    def text_sample(self, index: int) -> dict[str, Any]:
        """The sample without its image: what the collator encodes."""
        item = self.items[index]
        return {
            "question_id": item.question_id,
            "question": item.prompt,
            "answers": item.answers,
            "options": item.options,
            "answer_index": item.answer_index,
            "qtype": item.qtype,
            "where": item.where,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.text_sample(index)
        try:
            loaded = self.image_loader(self.items[index].image_path)
        except (FileNotFoundError, ValueError) as err:
            raise BadSample(Problem(sample["where"], sample["question_id"], str(err),
                                    "replace or remove the image")) from err
        clash = sample.keys() & loaded.keys()
        if clash:
            raise ValueError(f"image_loader returned keys the item already has: {sorted(clash)}")
        return {**sample, **loaded}
