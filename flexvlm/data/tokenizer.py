"""Tokenizers: a word-level one for the synthetic task, wrappers of HF `tokenizer.json` files and of
sentencepiece `tokenizer.model` files, and `load_tokenizer` that picks one for a folder.

All map the `<image>` placeholder to IMAGE_TOKEN_INDEX the way LLaVA's `tokenizer_image_token`
does: the text is split on the placeholder and each piece is encoded on its own.
"""

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers

from flexvlm.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

Offsets = list[tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and generation need from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; `<image>` -> IMAGE_TOKEN_INDEX."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Ids plus each token's (start, end) character span in `text`."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens and image placeholders are dropped."""
        ...


class _PlaceholderTokenizer(ABC):
    """Splits text on `<image>` and encodes the pieces with `_encode_piece`."""

    @abstractmethod
    def _encode_piece(self, text: str) -> tuple[list[int], Offsets]:
        """Ids and offsets of text that holds no placeholder."""

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                offsets.append((start - len(IMAGE_PLACEHOLDER), start))
            if piece:  # LLaVA encodes an empty piece to nothing (its BOS is stripped)
                piece_ids, piece_offsets = self._encode_piece(piece)
                ids += piece_ids
                offsets += [(start + s, start + e) for s, e in piece_offsets]
            start += len(piece) + len(IMAGE_PLACEHOLDER)
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]


class WordTokenizer(_PlaceholderTokenizer):
    """Whitespace word-level tokenizer: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, then `words`. A word
    in angle brackets (an architecture's `<global-img>`) is split out of running text, as HF
    tokenizers split their added tokens; whitespace (newlines too) only separates words."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

    def __init__(self, words: list[str]) -> None:
        vocab = [*self.SPECIALS, *words]
        if len(set(vocab)) != len(vocab):
            raise ValueError("WordTokenizer: words must be unique and not special tokens")
        self.id_to_word = vocab
        self.word_to_id = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)
        self.vocab_size = len(vocab)
        bracketed = sorted((w for w in words if re.fullmatch(r"<\S+>", w)), key=len, reverse=True)
        self._word = re.compile("".join(f"{re.escape(w)}|" for w in bracketed) + r"\S+")

    def with_words(self, words: list[str]) -> "WordTokenizer":
        """This vocabulary and then the ``words`` it lacks: every id it had keeps its word."""
        return WordTokenizer([*self.id_to_word[len(self.SPECIALS):], *(w for w in words if w not in self.word_to_id)])

    def _encode_piece(self, text: str) -> tuple[list[int], Offsets]:
        matches = list(self._word.finditer(text))
        ids = [self.word_to_id.get(m.group(), self.unk_id) for m in matches]
        return ids, [m.span() for m in matches]

    def decode(self, ids: list[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        # a model's embedding table may be larger than the vocabulary: its extra ids read as <unk>
        kept = (i for i in ids if i >= 0 and i not in skip)
        return " ".join(self.id_to_word[i if i < self.vocab_size else self.unk_id] for i in kept)


def _token_content(value: str | dict | None) -> str | None:
    """A special token as stored in HF json files: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(folder: Path) -> dict[str, str]:
    """`{bos,eos,pad,unk}_token` spellings from `tokenizer_config.json`, overridden by
    `special_tokens_map.json` (as `transformers` resolves them); unset ones are left out."""
    config: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            loaded = json.loads((folder / name).read_text())
            config.update({k: v for k, v in loaded.items() if v is not None})
    names = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {k: v for k, v in names.items() if v}


class HFTokenizer(_PlaceholderTokenizer):
    """A HuggingFace `tokenizer.json` (path to the file or to its folder), no `transformers`.

    BOS / EOS / PAD come from `tokenizer_config.json`, overridden by `special_tokens_map.json`
    (as `transformers` resolves them); defaults `<s>`, `</s>`, and pad = unk, else eos.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        self._tok = tokenizers.Tokenizer.from_file(str(file))
        names = _special_tokens(file.parent)
        bos, eos = names.get("bos_token", "<s>"), names.get("eos_token", "</s>")
        pad = names.get("pad_token") or names.get("unk_token") or eos
        self.bos_id, self.eos_id, self.pad_id = (self._id(t, file) for t in (bos, eos, pad))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str, file: Path) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary of {file}")
        return token_id

    def _encode_piece(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)


class SentencePieceTokenizer(_PlaceholderTokenizer):
    """A sentencepiece `tokenizer.model` (path to the file or to its folder), for folders that have
    no `tokenizer.json` (LLaVA-1.5's, Vicuna's).

    Encodes like transformers' slow (legacy) LlamaTokenizer that LLaVA-1.5 trained with: the
    spellings of the special tokens become their ids, and each stretch of text between them is
    encoded by sentencepiece on its own, dummy-prefix space included. Special tokens are resolved
    as in HFTokenizer; defaults: the model's own BOS / EOS, and pad = unk (LLaVA's choice).
    """

    def __init__(self, path: str | Path) -> None:
        import sentencepiece  # only this tokenizer needs it

        path = Path(path)
        file = path / "tokenizer.model" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        own = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(), "unk_token": self._sp.unk_id()}
        names = {k: self._sp.id_to_piece(i) for k, i in own.items() if i >= 0} | _special_tokens(file.parent)
        names.setdefault("pad_token", names.get("unk_token"))
        ids = {k: self._id(names.get(k), k, file) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.vocab_size = self._sp.get_piece_size()
        self._special_ids = {names[k]: i for k, i in ids.items()}
        # longest first, so that a special token that contains another one wins
        self._special_re = re.compile("|".join(map(re.escape, sorted(self._special_ids, key=len, reverse=True))))

    def _id(self, token: str | None, what: str, file: Path) -> int:
        token_id = self._sp.piece_to_id(token) if token else -1
        if token_id < 0 or self._sp.id_to_piece(token_id) != token:  # unknown pieces map to unk silently
            raise ValueError(f"{what} {token!r} is not in the vocabulary of {file}")
        return token_id

    def _encode_piece(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for match in [*self._special_re.finditer(text), None]:
            end = match.start() if match else len(text)
            if end > start:
                span_ids, span_offsets = self._encode_text(text[start:end])
                ids += span_ids
                offsets += [(start + s, start + e) for s, e in span_offsets]
            if match:
                ids.append(self._special_ids[match.group()])
                offsets.append(match.span())
                start = match.end()
        return ids, offsets

    def _encode_text(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self._sp.encode(text, return_type="offset_mapping")
        ids, offsets = encoding["ids"], list(encoding["offsets"])
        # sentencepiece gives a character's span to its last byte-fallback piece only; the earlier
        # ones get the same span, so a reply that starts with a multi-byte character is all target
        for i in reversed(range(len(ids) - 1)):
            if offsets[i][0] == offsets[i][1] and self._sp.is_byte(ids[i]):
                offsets[i] = offsets[i + 1]
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        special = set(self._special_ids.values())
        # a model's embedding table may be larger than the vocabulary: its extra ids are dropped
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i not in special])


def load_tokenizer(path: str | Path) -> HFTokenizer | SentencePieceTokenizer:
    """The tokenizer of a model folder: `tokenizer.json` if there is one, else `tokenizer.model`
    (a path to either file works too)."""
    path = Path(path)
    if path.is_dir():
        for name, kind in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return kind(path / name)
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    return SentencePieceTokenizer(path) if path.suffix == ".model" else HFTokenizer(path)
