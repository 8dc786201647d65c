"""Chat templates: a hand-computed Vicuna v1 example, LLaVA's preprocess_v1 masking reproduced,
and the plain template of the synthetic task."""

import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.data.templates import PlainTemplate, VicunaV1Template
from flexvlm.data.tokenizer import HFTokenizer, WordTokenizer

from test_data_tokenizer import llava_tokenizer_image_token

SYSTEM = VicunaV1Template.system
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is it?"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "And the sky?"},
    {"from": "gpt", "value": "Blue."},
]


def test_vicuna_system_text_is_llava_conv_vicuna_v1():
    assert SYSTEM == (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )


def test_vicuna_hand_computed_word_level():
    words = sorted({*SYSTEM.split(), "USER:", "ASSISTANT:", "What", "colour", "is", "it?", "It",
                    "red.", "And", "the", "sky?", "Blue."})
    tok = WordTokenizer(words)
    ids = tok.word_to_id
    expected_tokens = (
        ["<s>", *SYSTEM.split(), "USER:", "<image>", "What", "colour", "is", "it?", "ASSISTANT:",
         "It", "is", "red.", "</s>", "USER:", "And", "the", "sky?", "ASSISTANT:", "Blue.", "</s>"]
    )
    targets = {"It", "is", "red.", "Blue.", "</s>"}
    first_reply = len(SYSTEM.split()) + 8  # <s>, system, USER: <image> What colour is it? ASSISTANT:
    input_ids, labels = VicunaV1Template().encode(CONVERSATION, tok)
    assert input_ids == [IMAGE_TOKEN_INDEX if t == "<image>" else ids[t] for t in expected_tokens]
    assert labels == [
        input_ids[i] if i >= first_reply and t in targets else IGNORE_INDEX
        for i, t in enumerate(expected_tokens)
    ]
    assert [t for t, l in zip(expected_tokens, labels) if l != IGNORE_INDEX] == [
        "It", "is", "red.", "</s>", "Blue.", "</s>"
    ]
    prompt = VicunaV1Template().prompt(CONVERSATION[:3], tok)
    assert prompt == input_ids[: expected_tokens.index("Blue.")]
    assert tok.decode(prompt).endswith("USER: And the sky? ASSISTANT:")


def llava_preprocess_v1(conversation, tokenizer):
    """LLaVA-1.5's train.py::preprocess_v1 for one image conversation (legacy tokenizer branch),
    with conv_vicuna_v1.get_prompt() written out."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    prompt = SYSTEM + seps[0]
    for i, turn in enumerate(conversation):
        prompt += roles[turn["from"]] + ": " + turn["value"] + seps[i % 2]

    input_ids = llava_tokenizer_image_token(prompt, tokenizer)
    target = list(input_ids)
    sep = seps[0] + roles["gpt"] + ": "
    total_len = len(target)
    rounds = prompt.split(seps[1])
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * (len(target) - cur_len)
    assert cur_len == total_len, "LLaVA's tokenization-mismatch check"
    return input_ids, target


@pytest.fixture(scope="module")
def llama_like_folder(tmp_path_factory):
    """A legacy-LLaMA-like tokenizer: Metaspace prepending '▁' to every piece, BOS added."""
    folder = tmp_path_factory.mktemp("llama")
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [SYSTEM] + [f"USER: {t['value']} ASSISTANT:" for t in CONVERSATION]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                    "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return folder


@pytest.mark.parametrize("turns", [2, 4])
def test_vicuna_matches_llava_preprocess_v1(llama_like_folder, turns):
    conversation = CONVERSATION[:turns]
    expected_ids, expected_labels = llava_preprocess_v1(
        conversation, AutoTokenizer.from_pretrained(llama_like_folder)
    )
    hf = HFTokenizer(llama_like_folder)
    input_ids, labels = VicunaV1Template().encode(conversation, hf)
    assert input_ids == expected_ids
    assert labels == expected_labels
    replies = " ".join(t["value"] for t in conversation if t["from"] == "gpt")
    assert hf.decode([label for label in labels if label != IGNORE_INDEX]) == replies


def test_plain_template_synthetic_example():
    tok = WordTokenizer(["red", "blue", "7", "3"])
    red, blue, seven, three = 4, 5, 6, 7
    conversation = [{"from": "human", "value": "<image>\nred"}, {"from": "gpt", "value": "7"}]
    assert PlainTemplate().encode(conversation, tok) == (
        [IMAGE_TOKEN_INDEX, red, seven, tok.eos_id],
        [IGNORE_INDEX, IGNORE_INDEX, seven, tok.eos_id],
    )
    assert PlainTemplate().prompt(conversation[:1], tok) == [IMAGE_TOKEN_INDEX, red]
    multi = conversation + [{"from": "human", "value": "blue"}, {"from": "gpt", "value": "3"}]
    input_ids, labels = PlainTemplate().encode(multi, tok)
    assert input_ids == [IMAGE_TOKEN_INDEX, red, seven, 2, blue, three, 2]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, seven, 2, IGNORE_INDEX, three, 2]


def test_labels_follow_whole_string_tokenisation(tmp_path):
    """With a byte-level BPE the space before a reply merges into the reply's first token:
    that token is still a target, and the prompt is exactly the sequence's prefix."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["the answer is seven", "what number is on the red tile"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    conversation = [{"from": "human", "value": "<image> what number"}, {"from": "gpt", "value": "seven"}]
    for template in (PlainTemplate(), VicunaV1Template()):
        input_ids, labels = template.encode(conversation, hf)
        prompt = template.prompt(conversation[:1], hf)
        assert input_ids[: len(prompt)] == prompt
        answer = [i for i, l in zip(input_ids, labels) if l != IGNORE_INDEX]
        assert answer == input_ids[len(prompt):] and answer[-1] == hf.eos_id
        assert hf.decode(answer) == " seven"  # 'Ġseven': the space rides on the target token


@pytest.mark.parametrize(
    "roles, method",
    [(["gpt", "human"], "encode"), (["human", "human"], "encode"), (["human"], "encode"),
     (["human", "gpt"], "prompt"), ([], "prompt")],
)
def test_turn_order_is_checked(roles, method):
    conversation = [{"from": r, "value": "x"} for r in roles]
    with pytest.raises(ValueError, match="alternate"):
        getattr(PlainTemplate(), method)(conversation, WordTokenizer(["x"]))
