"""Evaluation protocols (docs/method.md, section 8): how a benchmark's batch is answered and scored.

A protocol gets an ``Answerer`` (the LightningModule, or a harness's adapter: its ``model``,
``answer`` for greedy generation, ``tokenizer`` and ``collator``) and a ``VQACollator`` batch. ``score`` updates the protocol's metric and returns
one record per sample for ``answers.jsonl``; ``compute`` gives the named numbers logged as
``<stage>/<name>``. Protocols are ``nn.Module``s so that their metric states follow the model to
its device, where DDP sums them.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from flexvlm.constants import IGNORE_INDEX
from flexvlm.data.tokenizer import Tokenizer
from flexvlm.metrics import (
    ExactMatchAccuracy,
    LikelihoodChoiceAccuracy,
    MultipleChoiceAccuracy,
    VQAAccuracy,
    YesNoAccuracy,
    exact_match,
    mean_answer_cross_entropy,
    parse_choice_letter,
    vqa_soft_score,
    yes_no_correct,
)

if TYPE_CHECKING:
    from flexvlm.data.collate import VQACollator
    from flexvlm.models.vlm import FlexVLM

Record = dict[str, Any]
Batch = dict[str, Any]


class Answerer(Protocol):
    """What a protocol uses of whoever holds the model: the LightningModule, or an evaluation
    harness's adapter (flexvlm/integrations)."""

    model: FlexVLM
    tokenizer: Tokenizer
    collator: VQACollator

    def answer(self, batch: Batch) -> tuple[list[str], Tensor, dict[int, Tensor]]:
        """Greedy answers to the batch's prompts, the HR fraction per sample, the prefill masks."""


@dataclass
class Scored:
    """A scored batch: one record per sample, the fraction of HR tokens each used (B,), and the
    selection masks at the prompt's end (FA layer -> (B, G, G); empty outside flex mode)."""

    records: list[Record]
    hr_fraction: Tensor
    masks: dict[int, Tensor] = field(default_factory=dict)


def prompt_texts(batch: Batch, tokenizer: Tokenizer) -> list[str]:
    """Each sample's question, else its decoded prompt (LLaVA conversations carry no question)."""
    if "question" in batch:
        return list(batch["question"])
    return [tokenizer.decode(ids[mask.bool()].tolist()) for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]


def gather_records(records: list[Record]) -> list[Record]:
    """Every process's records, in rank order (the records themselves outside DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list[list[Record]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def _records(module: Answerer, batch: Batch, answers: list[str], fraction: Tensor,
             extras: list[Record]) -> list[Record]:
    """One record a sample, with the sample's ``tags`` where its dataset gives them (a dict: its
    question kind, ...), so that results split by them."""
    prompts = prompt_texts(batch, module.tokenizer)
    tags = [{"tags": tag} for tag in batch["tags"]] if "tags" in batch else [{}] * len(answers)
    return [
        {"question_id": qid, "prompt": prompt, "answer": answer, "hr_fraction": f, **tag, **extra}
        for qid, prompt, answer, f, tag, extra in zip(batch["question_id"], prompts, answers, fraction.tolist(), tags,
                                                      extras, strict=True)
    ]


class EvaluationProtocol(nn.Module, ABC):
    """Answers a benchmark's batches and scores them with its metric."""

    def __init__(self, metric: Metric) -> None:
        super().__init__()
        self.metric = metric

    @abstractmethod
    def score(self, module: Answerer, batch: Batch) -> Scored:
        """Answers the batch and updates the metric."""

    def compute(self) -> dict[str, Tensor]:
        """The metric's numbers by name; ``accuracy`` is the benchmark's headline number."""
        return {"accuracy": self.metric.compute()}

    def restore(self, records: list[Record]) -> None:
        """Counts the verdicts of records written before (a restarted evaluation's answers)."""
        self.metric.add([float(r["correct"]) for r in records])

    def reset(self) -> None:
        self.metric.reset()


class _GeneratedAnswers(EvaluationProtocol):
    """Greedy answers from ``module.answer`` (the model's ``max_new_tokens`` and ``stop_strings``),
    judged by ``check``."""

    def score(self, module: Answerer, batch: Batch) -> Scored:
        answers, fraction, masks = module.answer(batch)
        return Scored(_records(module, batch, answers, fraction, self.check(answers, batch)), fraction, masks)

    @abstractmethod
    def check(self, answers: list[str], batch: Batch) -> list[Record]:
        """Updates the metric with the batch's answers; returns each answer's verdict fields."""


class GenerationVQA(_GeneratedAnswers):
    """VQA soft accuracy against every reference answer (TextVQA; the built-in task)."""

    def __init__(self) -> None:
        super().__init__(VQAAccuracy())

    def check(self, answers: list[str], batch: Batch) -> list[Record]:
        self.metric.update(answers, batch["answers"])
        return [{"references": refs, "score": vqa_soft_score(a, refs)} for a, refs in zip(answers, batch["answers"])]

    def restore(self, records: list[Record]) -> None:
        self.metric.add([r["score"] for r in records])


class ExactMatch(_GeneratedAnswers):
    """The normalised answer equals the first reference."""

    def __init__(self) -> None:
        super().__init__(ExactMatchAccuracy())

    def check(self, answers: list[str], batch: Batch) -> list[Record]:
        targets = [refs[0] for refs in batch["answers"]]
        self.metric.update(answers, targets)
        return [{"reference": t, "correct": exact_match(a, t)} for a, t in zip(answers, targets)]


class LetterChoice(_GeneratedAnswers):
    """MagnifierBench: the option letter parsed from the answer must be the right one."""

    def __init__(self) -> None:
        super().__init__(MultipleChoiceAccuracy())

    def check(self, answers: list[str], batch: Batch) -> list[Record]:
        options, truth = batch["options"], batch["answer_index"]
        self.metric.update(answers, options, truth)
        picks = [parse_choice_letter(a, o) for a, o in zip(answers, options)]
        letters = string.ascii_uppercase
        return [{"choice": None if p is None else letters[p], "reference": letters[t], "correct": p == t}
                for p, t in zip(picks, truth)]


class YesNo(_GeneratedAnswers):
    """RSVQA-HRBEN: accuracy per question type (``accuracy/<type>``) and their mean (``accuracy``)."""

    def __init__(self) -> None:
        super().__init__(YesNoAccuracy())

    def check(self, answers: list[str], batch: Batch) -> list[Record]:
        targets = [refs[0] for refs in batch["answers"]]
        self.metric.update(answers, targets, batch["qtype"])
        return [{"reference": t, "qtype": q, "correct": yes_no_correct(a, t)}
                for a, t, q in zip(answers, targets, batch["qtype"])]

    def compute(self) -> dict[str, Tensor]:
        scores = self.metric.compute()
        return {"accuracy": scores.pop("average"), **{f"accuracy/{qtype}": v for qtype, v in scores.items()}}

    def restore(self, records: list[Record]) -> None:
        self.metric.add([r["correct"] for r in records], [r["qtype"] for r in records])


def _labels_for_logits(labels: Tensor, length: int) -> Tensor:
    """Token labels aligned with logits over the spliced sequence, where the image's tokens replace
    its one ``<image>`` id. Every labelled token follows the image (the prompt holds it), so
    shifting all labels right by the image's extra positions aligns them."""
    return F.pad(labels, (length - labels.shape[1], 0), value=IGNORE_INDEX)


class LikelihoodChoice(EvaluationProtocol):
    """V* Bench: each option appended to the prompt as the answer, one teacher-forced pass over
    every (question, option) pair of the batch; the option with the lowest mean answer
    cross-entropy is the prediction. Nothing is generated."""

    def __init__(self) -> None:
        super().__init__(LikelihoodChoiceAccuracy())

    def score(self, module: Answerer, batch: Batch) -> Scored:
        counts = [len(options) for options in batch["options"]]
        # the collator renders each pair through the chat template, answer tokens as the labels
        pairs = module.collator([
            {"question": batch["question"][i], "answer": option, "question_id": batch["question_id"][i],
             "image": batch["images"][i], "content_box": batch["content_box"][i]}
            for i, options in enumerate(batch["options"]) for option in options
        ])
        device = batch["images"].device
        labels = pairs["labels"].to(device)
        out = module.model(pairs["input_ids"].to(device), pairs["attention_mask"].to(device), pairs["images"],
                           pairs["content_box"], labels=labels)
        losses = mean_answer_cross_entropy(out.logits, _labels_for_logits(labels, out.logits.shape[1]))

        sizes = torch.tensor(counts, device=device)
        owner = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes)  # question of each pair
        column = torch.cat([torch.arange(n, device=device) for n in counts])
        table = losses.new_full((len(counts), max(counts)), float("inf"))  # +inf: no such option
        table[owner, column] = losses
        truth = torch.tensor(batch["answer_index"], device=device)
        self.metric.update(table, truth)

        choice = table.argmin(-1)
        chosen = sizes.cumsum(0) - sizes + choice  # the chosen pair of each question
        fraction = torch.zeros(len(counts), device=device)
        if out.sample_fraction is not None:  # each question's mean over its options
            fraction = fraction.index_add(0, owner, out.sample_fraction.float()) / sizes
        # the first selecting row of a pair is the prompt's last token, as at generation's prefill
        masks = {layer: m[chosen, 0] for layer, m in out.selection_masks.items()}
        answers = [options[c] for options, c in zip(batch["options"], choice.tolist())]
        extras = [{"choice": c, "reference": t, "correct": c == t, "losses": row[:n].tolist()}
                  for c, t, row, n in zip(choice.tolist(), truth.tolist(), table, counts)]
        return Scored(_records(module, batch, answers, fraction, extras), fraction, masks)
