"""Qwen2-VL / Qwen2.5-VL's multimodal RoPE (flexvlm/architectures/qwen2_vl/positions.py) against transformers'
``get_rope_index`` (of tiny random models), its text rotary embedding and ``apply_rotary_pos_emb``, and by hand."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import (  # noqa: E402
    Qwen2VLRotaryEmbedding,
    apply_rotary_pos_emb,
)

from flexvlm.architectures.qwen2_vl.positions import image_positions, mrope_cos_sin, rope_index  # noqa: E402
from flexvlm.models.decoder import RotaryEmbedding, apply_rope  # noqa: E402

HEAD_DIM, THETA, SECTION = 16, 10000.0, [2, 3, 3]  # 8 rotary frequencies: 2 temporal, 3 height, 3 width
TEXT = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": THETA, "mrope_section": SECTION}}
VISION = {"depth": 1, "num_heads": 2, "spatial_merge_size": 2}
MODELS = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLModel, Qwen2VLRotaryEmbedding, {"embed_dim": 16, "hidden_size": 32}),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLRotaryEmbedding,
                   {"hidden_size": 16, "intermediate_size": 16, "out_hidden_size": 32}),
}
IMAGE_TOKEN = 151655  # the configs' image_token_id

# samples as pieces: an int n is n text tokens, a grid (t, h, w) is an image's run of t h w / 4 pad tokens
SAMPLES = [
    [3, (1, 4, 6), 2, (1, 8, 4), 4],  # two images of different grids, 6 and 8 tokens
    [5, (1, 2, 2), 1],  # one image of one token
    [7],  # text only
    [(1, 6, 2), 3, (1, 2, 10)],  # images first and last, one tall, one wide
]


@pytest.fixture(scope="module", params=list(MODELS))
def family(request):
    """(transformers' model, its text rotary embedding) of a tiny random model."""
    config_class, model_class, rotary_class, vision = MODELS[request.param]
    config = config_class(vision_config={**VISION, **vision}, text_config=TEXT, image_token_id=IMAGE_TOKEN)
    return model_class(config).eval(), rotary_class(config.text_config)


def _batch(samples, padding_side):
    """(input_ids, attention_mask, image grids in order) of the samples, padded on ``padding_side``."""
    generator = torch.Generator().manual_seed(0)
    rows, grids = [], []
    for pieces in samples:
        row = []
        for piece in pieces:
            if isinstance(piece, int):
                row += torch.randint(2, 64, (piece,), generator=generator).tolist()
            else:
                row += [IMAGE_TOKEN] * (piece[0] * piece[1] * piece[2] // 4)
                grids.append(piece)
        rows.append(row)
    length = max(map(len, rows))
    input_ids = torch.ones(len(rows), length, dtype=torch.long)  # 1: the padding id
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), None) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span], attention_mask[b, span] = torch.tensor(row), 1
    return input_ids, attention_mask, torch.tensor(grids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_rope_index_equals_transformers(family, padding_side):
    model = family[0]
    input_ids, attention_mask, grids = _batch(SAMPLES, padding_side)
    image_mask = input_ids == IMAGE_TOKEN
    expected, expected_deltas = model.get_rope_index(input_ids, mm_token_type_ids=image_mask.int(),
                                                     image_grid_thw=grids, attention_mask=attention_mask)
    positions, deltas = rope_index(image_mask, grids, 2, attention_mask)
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)


def test_rope_index_without_padding_equals_transformers(family):
    model = family[0]
    input_ids, _, grids = _batch(SAMPLES[:1], "right")
    image_mask = input_ids == IMAGE_TOKEN
    expected, expected_deltas = model.get_rope_index(input_ids, mm_token_type_ids=image_mask.int(),
                                                     image_grid_thw=grids)
    positions, deltas = rope_index(image_mask, grids, 2)
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)


def test_rope_index_by_hand():
    """2 text tokens; an image of 2 x 4 patches (1 x 2 tokens) from 2: (t, h, w) = (2, 2, 2), (2, 2, 3), the text
    then goes on from 2 + max(1, 2) = 4; touching it, an image of 4 x 2 patches (2 x 1 tokens): (4, 4, 4),
    (4, 5, 4), then 4 + 2 = 6; one text token at 6. Left-padded by one, at position 0. Delta: 6 + 1 - 7 = 0."""
    image_mask = torch.tensor([[False, False, False, True, True, True, True, False]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    positions, deltas = rope_index(image_mask, [(1, 2, 4), (1, 4, 2)], 2, attention_mask)
    assert positions[:, 0].tolist() == [[0, 0, 1, 2, 2, 4, 4, 6], [0, 0, 1, 2, 2, 4, 5, 6], [0, 0, 1, 2, 3, 4, 4, 6]]
    assert deltas.tolist() == [[0]]
    # a 4 x 6-token image from 3: the deltas count what the grid saves, 3 + 6 - (3 + 24) = -18
    assert rope_index(torch.tensor([[False] * 3 + [True] * 24]), [(1, 8, 12)], 2)[1].tolist() == [[-18]]
    assert image_positions((1, 4, 4), 2, 10).tolist() == [[10] * 4, [10, 10, 11, 11], [10, 11, 10, 11]]


def test_rope_index_refusals():
    mask = torch.tensor([[False, True, True, False]])
    with pytest.raises(ValueError, match="image 0 of grid \\(1, 2, 6\\) needs 3 image tokens in a row, found 2"):
        rope_index(mask, [(1, 2, 6)], 2)
    with pytest.raises(ValueError, match="more images than the 1 grids"):
        rope_index(mask, [(1, 2, 2)], 2)
    with pytest.raises(ValueError, match="holds 2 grids, the batch 1 images"):
        rope_index(mask, [(1, 2, 4), (1, 2, 2)], 2)
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        rope_index(mask, [(1, 3, 4)], 2)
    with pytest.raises(ValueError, match="sample 0 has no attended token"):
        rope_index(mask, [], 2, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mrope_equals_transformers(family, padding_side):
    """cos / sin of transformers' text rotary embedding for the batch's 3-D positions, and q / k rotated by them;
    the inverse frequencies are flexvlm's decoder's."""
    model, rotary = family
    input_ids, attention_mask, grids = _batch(SAMPLES, padding_side)
    positions, _ = rope_index(input_ids == IMAGE_TOKEN, grids, 2, attention_mask)
    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(len(SAMPLES), 2, input_ids.shape[1], HEAD_DIM, generator=generator) for _ in range(2))
    expected_cos, expected_sin = rotary(q, positions)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, expected_cos, expected_sin)

    cos, sin = mrope_cos_sin(positions, RotaryEmbedding(HEAD_DIM, THETA).inv_freq, SECTION)
    for actual, expected in ((cos, expected_cos), (sin, expected_sin), (apply_rope(q, cos, sin), expected_q),
                             (apply_rope(k, cos, sin), expected_k)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # the same float32 operations: every bit


def test_text_positions_equal_transformers(family):
    """(B, L) positions: every axis the same, transformers' plain text RoPE."""
    rotary = family[1]
    positions = torch.arange(12).expand(2, -1)
    expected_cos, expected_sin = rotary(torch.zeros(1), positions)
    cos, sin = mrope_cos_sin(positions, RotaryEmbedding(HEAD_DIM, THETA).inv_freq, SECTION)
    torch.testing.assert_close((cos, sin), (expected_cos, expected_sin), rtol=0, atol=0)


def test_mrope_by_hand():
    """Sections (1, 1, 1) of inverse frequencies (1, 0.1, 0.01) at (t, h, w) = (5, 7, 9): angles 5, 0.7, 0.09."""
    cos, sin = mrope_cos_sin(torch.tensor([5, 7, 9]).view(3, 1, 1), torch.tensor([1.0, 0.1, 0.01]), [1, 1, 1])
    angles = torch.tensor([5.0, 0.7, 0.09] * 2)
    torch.testing.assert_close((cos[0, 0], sin[0, 0]), (angles.cos(), angles.sin()))
    with pytest.raises(ValueError, match="sums to 3, not to the 4 rotary frequencies"):
        mrope_cos_sin(torch.zeros(3, 1, 1), torch.ones(4), [1, 1, 1])
    with pytest.raises(ValueError, match="expected \\(3, B, L\\) or \\(B, L\\)"):
        mrope_cos_sin(torch.zeros(2, 1, 1), torch.ones(3), [1, 1, 1])
