"""Tokenizers: the word-level one by hand, the HF wrapper against `transformers` and LLaVA's
`tokenizer_image_token` on a tokenizer trained in the test."""

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.data.tokenizer import HFTokenizer, Tokenizer, WordTokenizer

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "What is the colour of the sky? It is blue, and the grass is green.",
    "Describe the image in detail. There are two cats on a red sofa.",
]


def write_hf_tokenizer(folder, config: dict | None = None) -> None:
    """A small LLaMA-like BPE (Metaspace, BOS added by the post-processor) in `folder`."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = config or {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """Verbatim logic of LLaVA-1.5's llava/mm_utils.py::tokenizer_image_token."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


# ---------------------------------------------------------------- WordTokenizer


def test_word_tokenizer_ids_and_specials():
    tok = WordTokenizer(["red", "7"])
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 6)
    assert tok.encode("<image>\nred 7  blah") == [IMAGE_TOKEN_INDEX, 4, 5, 3]  # blah -> <unk>
    assert tok.encode("red<image>7") == [4, IMAGE_TOKEN_INDEX, 5]
    assert tok.encode("") == []


def test_word_tokenizer_offsets_and_decode():
    tok = WordTokenizer(["red", "7"])
    ids, offsets = tok.encode_with_offsets("<image> red  7")
    assert ids == [IMAGE_TOKEN_INDEX, 4, 5]
    assert offsets == [(0, 7), (8, 11), (13, 14)]
    assert tok.decode([1, IMAGE_TOKEN_INDEX, 4, 5, 2, 0]) == "red 7"


def test_word_tokenizer_rejects_duplicates():
    with pytest.raises(ValueError):
        WordTokenizer(["red", "red"])
    with pytest.raises(ValueError):
        WordTokenizer(["</s>"])


# ---------------------------------------------------------------- HFTokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_hf_tokenizer(folder)
    return folder


TEXTS = [
    "What is the colour of the sky?",
    "  two cats</s>on a sofa",  # leading spaces, a special token inside the text
    "Zebra! unseen wörds 123",
]


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_matches_transformers(hf_folder, text):
    reference = AutoTokenizer.from_pretrained(hf_folder)
    tok = HFTokenizer(hf_folder)
    expected = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) == expected["input_ids"]
    assert offsets == [tuple(o) for o in expected["offset_mapping"]]
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_hf_tokenizer_special_ids(hf_folder):
    reference = AutoTokenizer.from_pretrained(hf_folder)
    tok = HFTokenizer(hf_folder / "tokenizer.json")  # the file itself works too
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.pad_id == reference.unk_token_id  # no pad token: LLaVA pads with unk
    assert tok.vocab_size == len(reference)


def test_hf_special_tokens_map_overrides_config_like_transformers(tmp_path):
    write_hf_tokenizer(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<unk>", "pad_token": {"content": "</s>"}})
    )
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )


@pytest.mark.parametrize(
    "prompt",
    [
        "<image>\nWhat is the colour of the sky?",
        "Describe<image>the image",
        "Two images <image> and <image>",
        "no image here",
    ],
)
def test_hf_image_placeholder_matches_llava(hf_folder, prompt):
    reference = AutoTokenizer.from_pretrained(hf_folder)
    tok = HFTokenizer(hf_folder)
    # LLaVA's function keeps the BOS that the tokenizer adds; ours adds none
    assert [tok.bos_id] + tok.encode(prompt) == llava_tokenizer_image_token(prompt, reference)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path)
    write_hf_tokenizer(tmp_path, config={"bos_token": "<bos>"})
    with pytest.raises(ValueError, match="<bos>"):
        HFTokenizer(tmp_path)


def test_word_tokenizer_decodes_ids_beyond_its_vocabulary_as_unk():
    tok = WordTokenizer(["red", "7"])
    assert tok.decode([4, tok.vocab_size + 10, 5, tok.eos_id]) == "red <unk> 7"
