"""Batching: samples -> padded token tensors (training and generation views) and image tensors."""

import math

import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from flexvlm.data.templates import ChatTemplate, Conversation
from flexvlm.data.tokenizer import Tokenizer


def sample_conversation(sample: dict) -> Conversation:
    """The sample's LLaVA conversation, or one built from `question` + `answer` (else the first
    of `answers`, else empty: benchmark samples may carry only references or none).

    Like LLaVA, a conversation without `<image>` gets it in front of its first human turn.
    """
    if "conversations" in sample:
        conversation = [dict(turn) for turn in sample["conversations"]]
    else:
        answer = sample.get("answer", (sample.get("answers") or [""])[0])
        conversation = [
            {"from": "human", "value": sample["question"]},
            {"from": "gpt", "value": answer},
        ]
    if not any(IMAGE_PLACEHOLDER in turn["value"] for turn in conversation):
        conversation[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{conversation[0]['value']}"
    return conversation


def _pad(rows: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    return torch.tensor(
        [[value] * (length - len(r)) + r if left else r + [value] * (length - len(r)) for r in rows],
        dtype=torch.long,
    )


class VQACollator:
    """Collates samples with `image`, `content_box` and a conversation (see sample_conversation).

    Batch keys: `input_ids`, `attention_mask`, `labels` (B, T), right-padded; `prompt_ids`,
    `prompt_mask` (B, P), left-padded prompts for generation (everything before the last reply);
    `images` (B, 3, S, S); `content_box` (B, 4); `answers` list[list[str]]; `question_id`
    list[str]; every `aux_*` tensor stacked; any other sample key (`question`, `options`, ...)
    as a list.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: ChatTemplate, pad_to_multiple: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.pad_to_multiple = pad_to_multiple

    def _length(self, rows: list[list[int]]) -> int:
        length = max(len(r) for r in rows)
        if self.pad_to_multiple:
            length = math.ceil(length / self.pad_to_multiple) * self.pad_to_multiple
        return length

    def __call__(self, samples: list[dict]) -> dict:
        input_ids, labels, prompts, answers = [], [], [], []
        for sample in samples:
            conversation = sample_conversation(sample)
            ids, target = self.template.encode(conversation, self.tokenizer)
            prompt = self.template.prompt(conversation[:-1], self.tokenizer)
            for name, row in (("input_ids", ids), ("prompt_ids", prompt)):
                if row.count(IMAGE_TOKEN_INDEX) != 1:
                    raise ValueError(
                        f"sample {sample.get('question_id')!r}: {name} must hold exactly one "
                        f"image token, found {row.count(IMAGE_TOKEN_INDEX)}"
                    )
            input_ids.append(ids)
            labels.append(target)
            prompts.append(prompt)
            answers.append(list(sample.get("answers", [conversation[-1]["value"]])))

        pad_id = self.tokenizer.pad_id
        length, prompt_length = self._length(input_ids), self._length(prompts)
        batch = {
            "input_ids": _pad(input_ids, pad_id, length),
            "attention_mask": _pad([[1] * len(r) for r in input_ids], 0, length),
            "labels": _pad(labels, IGNORE_INDEX, length),
            "prompt_ids": _pad(prompts, pad_id, prompt_length, left=True),
            "prompt_mask": _pad([[1] * len(r) for r in prompts], 0, prompt_length, left=True),
            "images": torch.stack([s["image"] for s in samples]),
            "content_box": torch.stack([s["content_box"] for s in samples]),
            "answers": answers,
            "question_id": [str(s.get("question_id", "")) for s in samples],
        }
        for key in samples[0]:
            if key.startswith("aux_"):
                batch[key] = torch.stack([s[key] for s in samples])
            elif key not in batch and key not in ("image", "conversations"):
                batch[key] = [s.get(key) for s in samples]
        return batch
