"""V* Bench as lmms-eval stores it (``lmms-lab-encoder/vstar-bench``: the question and its lettered
options in one ``text``, "(A) ... (B) ...", the right option's letter in ``label``), read for
flexvlm's likelihood protocol: the question alone is the prompt, as flexvlm's V* reader writes it,
and each option is an answer to score. configs/lmms_eval/vstar_bench_likelihood.yaml names these."""

from __future__ import annotations

import re
import string
from typing import Any

_OPTION_LETTER = re.compile(r"\(([A-Z])\)\s*")


def _split(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """The question and the options of ``doc["text"]``; anything after an option's line (the
    letter-answer instruction lmms-eval's prompt ends with) is not part of it."""
    question, *parts = _OPTION_LETTER.split(doc["text"])
    letters, texts = parts[0::2], parts[1::2]
    if not letters or letters != list(string.ascii_uppercase[:len(letters)]):
        raise ValueError(f"V* question {doc.get('question_id')}: expected options (A), (B), ... in its text, "
                         f"found {letters}: {doc['text']!r:.200}")
    return question.strip(), [text.split("\n", 1)[0].strip() for text in texts]


def question(doc: dict[str, Any]) -> str:
    return _split(doc)[0]


def options(doc: dict[str, Any]) -> list[str]:
    return _split(doc)[1]


def answer_index(doc: dict[str, Any]) -> int:
    return string.ascii_uppercase.index(doc["label"].strip().upper())
