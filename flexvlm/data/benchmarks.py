"""Readers for the evaluation sets, each giving a list of ``BenchmarkItem``s; a Dataset over them.

Prompts follow the evaluation protocols (docs/method.md, section 8); each starts with the image
placeholder as LLaVA does: "<image>\\n...".
"""

import json
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from flexvlm.constants import IMAGE_PLACEHOLDER

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
LETTER_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VSTAR_SUBSETS = ("direct_attributes", "relative_position")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_RSVQA_IMAGE_SUFFIXES = (".tif", ".png")  # the release ships .tif; converted copies are .png
_RSVQA_QTYPES = {"comp": "comparison"}  # the release's names -> the names papers report


@dataclass
class BenchmarkItem:
    """One evaluation question. ``options``/``answer_index`` are set for multiple choice only."""

    question_id: str
    image_path: str
    prompt: str
    answers: list[str]
    options: list[str] | None = None
    answer_index: int | None = None
    qtype: str | None = None


# --- Helpers --------------------------------------------------------------------------------


def _with_image(text: str) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{text}"


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _load_json(path: str | Path, what: str) -> Any:
    path = _existing(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def _field(entry: Any, keys: Sequence[str], where: str) -> Any:
    """The value of the first of ``keys`` in ``entry``; an error naming them all if none is."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    for key in keys:
        if key in entry:
            return entry[key]
    raise ValueError(f"{where}: missing key {' / '.join(repr(k) for k in keys)}")


def _list_field(data: Any, key: str, path: Path) -> list:
    value = _field(data, [key], str(path))
    if not isinstance(value, list):
        raise ValueError(f"{path}: {key!r} must be a list")
    return value


# --- TextVQA --------------------------------------------------------------------------------


def read_textvqa(annotation_file: str | Path, image_dir: str | Path) -> list[BenchmarkItem]:
    """TextVQA val: ``{"data": [{"question_id", "image_id", "question", "answers"}]}`` and
    ``{image_dir}/{image_id}.jpg``; scored with ``VQAAccuracy`` against the 10 answers."""
    path = Path(annotation_file)
    image_dir = _existing(image_dir, "TextVQA image folder")
    items = []
    for i, entry in enumerate(_list_field(_load_json(path, "TextVQA annotations"), "data", path)):
        where = f"{path} entry {i}"
        question = _field(entry, ["question"], where)
        items.append(BenchmarkItem(
            question_id=str(_field(entry, ["question_id"], where)),
            image_path=str(image_dir / f"{_field(entry, ['image_id'], where)}.jpg"),
            prompt=_with_image(f"{question}\n{SHORT_ANSWER_INSTRUCTION}"),
            answers=list(_field(entry, ["answers"], where)),
        ))
    return items


# --- V* Bench -------------------------------------------------------------------------------


def read_vstar(root: str | Path) -> list[BenchmarkItem]:
    """V* Bench: ``{root}/{subset}/x.jpg`` with ``x.json`` holding ``question`` and ``options``.

    Scored by likelihood: the prompt is "<image>\\n{question}" with no instruction, and each
    option is a candidate answer. The release lists the correct option first: ``answer_index``
    is 0.
    """
    root = _existing(root, "V* Bench folder")
    items = []
    for subset in VSTAR_SUBSETS:
        folder = _existing(root / subset, "V* Bench subset folder")
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            annotation_path = image.with_suffix(".json")
            annotation = _load_json(annotation_path, "V* Bench annotation")
            options = _field(annotation, ["options"], str(annotation_path))
            if not isinstance(options, list) or not options:
                raise ValueError(f"{annotation_path}: 'options' must be a non-empty list")
            items.append(BenchmarkItem(
                question_id=f"{subset}/{image.stem}",
                image_path=str(image),
                prompt=_with_image(_field(annotation, ["question"], str(annotation_path))),
                answers=[options[0]],
                options=options,
                answer_index=0,
                qtype=subset,
            ))
    return items


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


def _answer_index(answer: Any, options: list[str], where: str) -> int:
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
    raise ValueError(f"{where}: answer {answer!r} matches none of the options {options}")


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The letter-answer prompt: the question, "A. ..." lines, then the instruction."""
    lines = [question, *(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))]
    return _with_image("\n".join([*lines, LETTER_ANSWER_INSTRUCTION]))


def read_magnifierbench(annotation_file: str | Path,
                        image_root: str | Path | None = None) -> list[BenchmarkItem]:
    """MagnifierBench: a JSON list of entries with ``id`` (or ``question_id``), ``image`` (or
    ``image_path``, or ``images``: a list whose first is used), ``question`` (or ``instruction``),
    ``options`` (or ``choices``; else parsed from "... A. x, B. y" in the question, as the release
    writes them) and ``answer`` (a letter, an index or the option's text). Image paths are
    relative to ``image_root``, by default the annotation file's folder."""
    path = Path(annotation_file)
    data = _load_json(path, "MagnifierBench annotations")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    image_root = Path(image_root) if image_root is not None else path.parent
    items = []
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        question = _field(entry, ["question", "instruction"], where)
        if "options" in entry or "choices" in entry:
            options = list(_field(entry, ["options", "choices"], where))
        else:
            question, options = _split_inline_options(question)
        if not options:
            raise ValueError(f"{where}: missing key 'options' / 'choices', and no 'A. ...' "
                             "options in the question")
        image = _field(entry, ["image", "image_path", "images"], where)
        image = image[0] if isinstance(image, list) else image
        answer_index = _answer_index(_field(entry, ["answer"], where), options, where)
        items.append(BenchmarkItem(
            question_id=str(_field(entry, ["id", "question_id"], where)),
            image_path=str(image_root / image),
            prompt=multiple_choice_prompt(question, options),
            answers=[string.ascii_uppercase[answer_index]],
            options=options,
            answer_index=answer_index,
        ))
    return items


# --- RSVQA-HRBEN ----------------------------------------------------------------------------


def _active_entries(entries: list, path: Path) -> Iterator[tuple[str, dict]]:
    """(where, entry) for each entry not marked ``"active": false``."""
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        if entry.get("active", True):
            yield where, entry


def _rsvqa_image(image_dir: Path, img_id: Any) -> Path:
    for suffix in _RSVQA_IMAGE_SUFFIXES:
        candidate = image_dir / f"{img_id}{suffix}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"RSVQA image not found: {image_dir / str(img_id)}"
                            f"{{{','.join(_RSVQA_IMAGE_SUFFIXES)}}}")


def read_rsvqa_hr(root: str | Path, split: str = "test",
                  qtypes: Iterable[str] | None = ("presence", "comparison")) -> list[BenchmarkItem]:
    """RSVQA-HRBEN as released: ``{root}/USGS_split_{split}_questions.json``
    (``{"questions": [{"id", "img_id", "question", "type", "answers_ids", "active"}]}``),
    ``USGS_split_{split}_answers.json`` (``{"answers": [{"id", "answer", "question_id",
    "active"}]}``) and ``{root}/Data/{img_id}.tif`` (or ``.png``).

    ``split`` is "test" (test set 1) or "test_phili" (test set 2). Inactive questions and answers
    are dropped, as in the release's own loader. The type "comp" is reported as "comparison";
    ``qtypes`` keeps those types (the paper's protocol: presence and comparison), None keeps all.
    """
    root = _existing(root, "RSVQA-HR folder")
    q_path = root / f"USGS_split_{split}_questions.json"
    a_path = root / f"USGS_split_{split}_answers.json"
    questions = _list_field(_load_json(q_path, "RSVQA questions"), "questions", q_path)
    answers = _list_field(_load_json(a_path, "RSVQA answers"), "answers", a_path)
    image_dir = _existing(root / "Data", "RSVQA image folder")
    keep = None if qtypes is None else set(qtypes)
    answer_by_id = {_field(a, ["id"], where): _field(a, ["answer"], where)
                    for where, a in _active_entries(answers, a_path)}
    items = []
    for where, q in _active_entries(questions, q_path):
        qtype = _field(q, ["type"], where)
        qtype = _RSVQA_QTYPES.get(qtype, qtype)
        if keep is not None and qtype not in keep:
            continue
        refs = [answer_by_id[a] for a in _field(q, ["answers_ids"], where) if a in answer_by_id]
        if not refs:
            raise ValueError(f"{where}: no active answer among answers_ids")
        items.append(BenchmarkItem(
            question_id=str(_field(q, ["id"], where)),
            image_path=str(_rsvqa_image(image_dir, _field(q, ["img_id"], where))),
            prompt=_with_image(f"{_field(q, ['question'], where)}\n{SHORT_ANSWER_INSTRUCTION}"),
            answers=refs,
            qtype=qtype,
        ))
    return items


# --- LLaVA question files -------------------------------------------------------------------


def read_llava_questions(question_file: str | Path, image_dir: str | Path) -> list[BenchmarkItem]:
    """A LLaVA-style ``.jsonl`` of ``{"question_id", "image", "text"}`` with optional ``answer`` or
    ``answers`` and ``category`` (kept as ``qtype``). The text is used as is (these files carry
    their instruction), behind "<image>\\n" unless it already holds the placeholder."""
    path = _existing(question_file, "question file")
    image_dir = Path(image_dir)
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e})") from e
        text = _field(entry, ["text"], where)
        answers = entry.get("answers", [entry["answer"]] if "answer" in entry else [])
        items.append(BenchmarkItem(
            question_id=str(_field(entry, ["question_id"], where)),
            image_path=str(image_dir / _field(entry, ["image"], where)),
            prompt=text if IMAGE_PLACEHOLDER in text else _with_image(text),
            answers=[answers] if isinstance(answers, str) else list(answers),
            qtype=entry.get("category"),
        ))
    return items


# --- Dataset --------------------------------------------------------------------------------


class BenchmarkDataset(Dataset):
    """Items plus their images, loaded lazily by ``image_loader(path) -> dict`` (for example
    ``flexvlm.data.image`` preprocessing); each sample is the item's fields and the loader's."""

    def __init__(self, items: Sequence[BenchmarkItem],
                 image_loader: Callable[[str], dict[str, Any]]) -> None:
        self.items = list(items)
        self.image_loader = image_loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        sample = {
            "question_id": item.question_id,
            "question": item.prompt,
            "answers": item.answers,
            "options": item.options,
            "answer_index": item.answer_index,
            "qtype": item.qtype,
        }
        loaded = self.image_loader(item.image_path)
        clash = sample.keys() & loaded.keys()
        if clash:
            raise ValueError(f"image_loader returned keys the item already has: {sorted(clash)}")
        return {**sample, **loaded}
