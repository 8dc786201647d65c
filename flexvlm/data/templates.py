"""Chat templates: a LLaVA conversation -> `input_ids` + `labels`, or a generation prompt.

A conversation is LLaVA's list of turns `{"from": "human" | "gpt", "value": str}`, alternating
and starting with a human turn. Labels are IGNORE_INDEX everywhere except the assistant replies
and the end token that closes each reply.

Text between special tokens is tokenised as one string and labels are assigned from character
offsets, so each reply's tokens are exactly those of the whole-string tokenisation (what the
model sees at inference), whatever the tokenizer does at word boundaries.
"""

from abc import ABC, abstractmethod
from typing import Any

from flexvlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from flexvlm.data.tokenizer import Tokenizer

Conversation = list[dict[str, str]]
ROLES = ("human", "gpt")


class SequenceBuilder:
    """Collects text pieces (target or not) and special ids into ids + labels."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []
        self._pieces: list[tuple[str, bool]] = []

    def text(self, text: str, target: bool = False) -> None:
        self._pieces.append((text, target))

    def special(self, token_id: int, target: bool = False) -> None:
        self._flush()
        self.ids.append(token_id)
        self.labels.append(token_id if target else IGNORE_INDEX)

    def build(self) -> tuple[list[int], list[int]]:
        self._flush()
        return self.ids, self.labels

    def _flush(self) -> None:
        spans, start = [], 0
        for piece, target in self._pieces:
            if target:
                spans.append((start, start + len(piece)))
            start += len(piece)
        ids, offsets = self.tokenizer.encode_with_offsets("".join(p for p, _ in self._pieces))
        for token_id, (s, e) in zip(ids, offsets):
            # a token is a target when it overlaps a reply; the image placeholder never is
            target = token_id >= 0 and any(s < b and a < e for a, b in spans)
            self.ids.append(token_id)
            self.labels.append(token_id if target else IGNORE_INDEX)
        self._pieces = []


def conversation_defect(conversation: Any) -> str | None:
    """What makes a LLaVA conversation unusable, or None: not a non-empty list of turns with string
    ``from`` / ``value``, text that is not valid Unicode (a lone surrogate, which no tokenizer
    encodes), roles that do not alternate human / gpt from a human turn to a gpt one, more than one
    image placeholder."""
    if not isinstance(conversation, list) or not conversation:
        return "'conversations' is missing or empty: a sample needs a human turn and a gpt reply"
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("from", "value")):
            return f"turn {i} is not an object with string 'from' and 'value': {turn!r:.80}"
        try:
            turn["value"].encode("utf-8")
        except UnicodeEncodeError as err:
            return f"turn {i}: text is not valid Unicode ({err.reason} at character {err.start})"
    roles = [turn["from"] for turn in conversation]
    if roles != [ROLES[i % 2] for i in range(len(roles))] or roles[-1] != "gpt":
        return f"roles {roles}: turns must alternate human / gpt, from a human turn to a gpt reply"
    images = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversation)
    if images > 1:
        return f"{images} {IMAGE_PLACEHOLDER} placeholders: one image a sample is supported"
    return None


def _check_turns(conversation: Conversation, last: str) -> None:
    roles = [turn["from"] for turn in conversation]
    expected = [ROLES[i % 2] for i in range(len(roles))]
    if not roles or roles != expected or roles[-1] != last:
        raise ValueError(
            f"conversation must alternate human/gpt from a human turn and end with {last!r}, "
            f"got roles {roles}"
        )


class ChatTemplate(ABC):
    """Renders conversations; subclasses say how each part looks."""

    def encode(self, conversation: Conversation, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
        """`input_ids` and `labels` of a conversation that ends with an assistant reply."""
        _check_turns(conversation, last="gpt")
        builder = self._render(conversation, tokenizer)
        return builder.build()

    def prompt(self, conversation: Conversation, tokenizer: Tokenizer) -> list[int]:
        """Ids of a conversation that ends with a human turn, up to where the reply starts."""
        _check_turns(conversation, last="human")
        builder = self._render(conversation, tokenizer)
        self._reply_start(builder)
        return builder.build()[0]

    def _render(self, conversation: Conversation, tokenizer: Tokenizer) -> SequenceBuilder:
        builder = SequenceBuilder(tokenizer)
        self._begin(builder)
        for turn in conversation:
            if turn["from"] == "human":
                self._human(builder, turn["value"])
            else:
                self._reply_start(builder)
                self._reply(builder, turn["value"])
        return builder

    @abstractmethod
    def _begin(self, b: SequenceBuilder) -> None:
        """What precedes the first turn (BOS, system text)."""

    @abstractmethod
    def _human(self, b: SequenceBuilder, text: str) -> None:
        """A human turn."""

    @abstractmethod
    def _reply_start(self, b: SequenceBuilder) -> None:
        """What opens an assistant reply; a generation prompt ends with it."""

    @abstractmethod
    def _reply(self, b: SequenceBuilder, text: str) -> None:
        """The reply itself (the target) and its end token."""


class VicunaV1Template(ChatTemplate):
    """LLaVA-1.5's `conv_vicuna_v1`: `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...`."""

    system = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    sep = " "

    def _begin(self, b: SequenceBuilder) -> None:
        b.special(b.tokenizer.bos_id)
        b.text(self.system + self.sep)

    def _human(self, b: SequenceBuilder, text: str) -> None:
        b.text(f"USER: {text}{self.sep}")

    def _reply_start(self, b: SequenceBuilder) -> None:
        b.text("ASSISTANT:")

    def _reply(self, b: SequenceBuilder, text: str) -> None:
        b.text(" ")
        b.text(text, target=True)
        b.special(b.tokenizer.eos_id, target=True)  # sep2 "</s>"


class PlainTemplate(ChatTemplate):
    """No system text or roles: `{q} {a}</s>`; the built-in synthetic task's template."""

    def _begin(self, b: SequenceBuilder) -> None:
        pass

    def _human(self, b: SequenceBuilder, text: str) -> None:
        b.text(text)

    def _reply_start(self, b: SequenceBuilder) -> None:
        pass

    def _reply(self, b: SequenceBuilder, text: str) -> None:
        b.text(" ")  # separates the words; not part of the target
        b.text(text, target=True)
        b.special(b.tokenizer.eos_id, target=True)
