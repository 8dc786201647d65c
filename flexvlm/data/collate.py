"""Batching: samples -> padded token tensors (training and generation views) and image tensors."""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from flexvlm.data.problems import BadSample, Problem, Skipped
from flexvlm.data.templates import ChatTemplate, Conversation, conversation_defect
from flexvlm.data.tokenizer import Tokenizer
from flexvlm.data.visuals import ImageProcessor, SquareImages, stack_square_images


def sample_conversation(sample: dict) -> Conversation:
    """The sample's LLaVA conversation, or one built from `question` + `answer` (else the first
    of `answers`, else empty: benchmark samples may carry only references or none).

    Like LLaVA, a conversation without `<image>` gets it in front of its first human turn. A
    conversation that cannot be used (``conversation_defect``) is a ValueError saying why.
    """
    if "conversations" in sample:
        conversation = sample["conversations"]
    else:
        answer = sample.get("answer", (sample.get("answers") or [""])[0])
        conversation = [{"from": "human", "value": sample.get("question")}, {"from": "gpt", "value": answer}]
    defect = conversation_defect(conversation)
    if defect:
        raise ValueError(defect)
    conversation = [dict(turn) for turn in conversation]
    if not any(IMAGE_PLACEHOLDER in turn["value"] for turn in conversation):
        conversation[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{conversation[0]['value']}"
    return conversation


@dataclass(frozen=True)
class SequenceLimits:
    """What the model takes, in text ids (the image placeholder counted once): ids below
    ``vocab_size``, training sequences of at most ``max_length`` ids, generation prompts of at most
    ``max_prompt_length`` (its positions less the image's tokens and the answer's)."""

    vocab_size: int
    max_length: int
    max_prompt_length: int


class SequenceCut(UserWarning):
    """A sequence cut to the model's positions; ``problem`` names the sample."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(frozen=True)
class Encoded:
    """One sample as ids: the training sequence and its labels, the generation prompt, the references."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answers: list[str]


def _pad(rows: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    return torch.tensor(
        [[value] * (length - len(r)) + r if left else r + [value] * (length - len(r)) for r in rows],
        dtype=torch.long,
    )


def _expanded(row: list[int], image_ids: list[int], where: list[int] | None = None) -> list[int]:
    """``row`` with ``image_ids`` in place of its image placeholder (found in ``where``, by default
    ``row`` itself: labels are expanded where their ids hold it)."""
    at = (where if where is not None else row).index(IMAGE_TOKEN_INDEX)
    return row[:at] + image_ids + row[at + 1:]


class VQACollator:
    """Collates samples with `image`, `content_box` and a conversation (see sample_conversation).

    Batch keys: `input_ids`, `attention_mask`, `labels` (B, T), right-padded; `prompt_ids`,
    `prompt_mask` (B, P), left-padded prompts for generation (everything before the last reply);
    `images` (B, 3, S, S); `content_box` (B, 4); `answers` list[list[str]]; `question_id`
    list[str]; every `aux_*` tensor stacked; any other sample key (`question`, `options`, ...)
    as a list; `skipped`: the records of the samples left out (``Problem.record``).

    ``processor``: a model's own image pipeline (``flexvlm.data.visuals``): its ``collate`` makes the
    image entries, and its ids replace each prompt's image placeholder; without it, samples hold
    LLaVA-1.5's square images.

    A sample that cannot be encoded is a ``BadSample`` naming it; with ``skip_bad`` it is left out
    of the batch instead (a batch of bad samples only has no `question_id` entries). With
    ``limits``, a training sequence longer than the model takes is cut (with a warning), and with
    ``generation`` a prompt that leaves no room for the answer is a bad sample.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, pad_to_multiple: int | None = None,
        limits: SequenceLimits | None = None, skip_bad: bool = False, generation: bool = True,
        processor: ImageProcessor | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.processor = processor
        self.pad_to_multiple = pad_to_multiple
        self.limits, self.skip_bad, self.generation = limits, skip_bad, generation

    @property
    def _image_keys(self) -> tuple[str, ...]:
        return (self.processor or SquareImages).sample_keys

    def _length(self, rows: list[list[int]]) -> int:
        length = max(len(r) for r in rows)
        if self.pad_to_multiple:
            length = math.ceil(length / self.pad_to_multiple) * self.pad_to_multiple
        return length

    def encode(self, sample: dict) -> Encoded:
        """The sample's ids, or a ``BadSample`` saying what is wrong with it."""
        sample_id = sample.get("question_id")

        def problem(what: str, fix: str = "", severity: str = "error") -> Problem:
            return Problem(sample.get("where", "sample"), None if sample_id is None else str(sample_id), what, fix,
                           severity)

        def bad(what: str, fix: str = "") -> BadSample:
            return BadSample(problem(what, fix))

        answers = sample.get("answers")
        if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise bad(f"'answers' must be a list of strings, got {answers!r:.80}")
        try:
            conversation = sample_conversation(sample)
            ids, labels = self.template.encode(conversation, self.tokenizer)
            prompt = self.template.prompt(conversation[:-1], self.tokenizer)
        except ValueError as err:
            raise bad(str(err), "fix or remove the sample") from err
        for name, row in (("input_ids", ids), ("prompt_ids", prompt)):
            if row.count(IMAGE_TOKEN_INDEX) != 1:
                raise bad(f"{name} must hold exactly one image token, found {row.count(IMAGE_TOKEN_INDEX)}")
        if self.processor is not None:
            image_ids = self.processor.image_ids(sample, self.tokenizer)
            ids, labels = _expanded(ids, image_ids), _expanded(labels, [IGNORE_INDEX] * len(image_ids), ids)
            prompt = _expanded(prompt, image_ids)
        if self.limits is not None:
            if self.generation and len(prompt) > self.limits.max_prompt_length:
                raise bad(f"the prompt is {len(prompt)} tokens, the model takes {self.limits.max_prompt_length} "
                          "(its positions less the image's tokens and model.max_new_tokens)",
                          "shorten the question or remove the sample")
            ids, labels = self._fit(ids, labels, problem)
        return Encoded(ids, labels, prompt, list(answers) if answers is not None else [conversation[-1]["value"]])

    def _fit(self, ids: list[int], labels: list[int], problem: Callable[..., Problem]) -> tuple[list[int], list[int]]:
        """The sequence cut to the model's positions (a ``SequenceCut`` warning); a BadSample if the
        image is cut off, or, for training, every reply."""
        limit = self.limits.max_length
        if len(ids) <= limit:
            return ids, labels
        ids, labels = ids[:limit], labels[:limit]
        lost = "image" if IMAGE_TOKEN_INDEX not in ids else None
        if lost is None and not self.generation and all(label == IGNORE_INDEX for label in labels):
            lost = "reply"
        if lost:
            raise BadSample(problem(f"{limit} tokens fit the model's positions, and the first {limit} hold no {lost}",
                                    "shorten the conversation"))
        warnings.warn(SequenceCut(problem(f"the conversation is longer than the model's positions, cut to its first "
                                          f"{limit} tokens", severity="warning")), stacklevel=3)
        return ids, labels

    def __call__(self, samples: list[dict | Skipped]) -> dict:
        kept, encoded, skipped = [], [], []
        for sample in samples:
            try:
                if isinstance(sample, Skipped):
                    raise BadSample(sample.problem)
                encoded.append(self.encode(sample))
                kept.append(sample)
            except BadSample as bad:
                if not self.skip_bad:
                    raise
                skipped.append(bad.problem.record())
        if not kept:
            return {"question_id": [], "skipped": skipped}

        input_ids = [e.input_ids for e in encoded]
        prompts = [e.prompt_ids for e in encoded]
        pad_id = self.tokenizer.pad_id
        length, prompt_length = self._length(input_ids), self._length(prompts)
        batch = {
            "input_ids": _pad(input_ids, pad_id, length),
            "attention_mask": _pad([[1] * len(r) for r in input_ids], 0, length),
            "labels": _pad([e.labels for e in encoded], IGNORE_INDEX, length),
            "prompt_ids": _pad(prompts, pad_id, prompt_length, left=True),
            "prompt_mask": _pad([[1] * len(r) for r in prompts], 0, prompt_length, left=True),
            **(self.processor.collate(kept) if self.processor is not None else stack_square_images(kept)),
            "answers": [e.answers for e in encoded],
            "question_id": [str(s.get("question_id", "")) for s in kept],
            "skipped": skipped,
        }
        for key in kept[0]:
            if key.startswith("aux_"):
                batch[key] = torch.stack([s[key] for s in kept])
            elif key not in batch and key not in (*self._image_keys, "conversations", "where"):
                batch[key] = [s.get(key) for s in kept]
        return batch
