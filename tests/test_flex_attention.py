"""FlexAttention against a naive eager implementation of docs/method.md, section 4."""

import math

import pytest
import torch

from flexvlm.models.flex_attention import (
    FLEX_IMPLS, FlexAttention, HighResState, SelectingRows, Selection, flex_attention, interpolate_rope,
)
from flexvlm.models.llm import Attention, KVCache, LlamaConfig, apply_rope, build_attention_inputs
from flexvlm.selection import AllSelection, SelectionStrategy

CONFIG = LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
G_LR, G_HR = 2, 4  # low-res 2 x 2, high-res 4 x 4 = 16 HR tokens


def _layer(seed=0):
    torch.manual_seed(seed)
    plain = Attention(CONFIG, layer_idx=1)
    flex = FlexAttention.from_attention(plain, CONFIG)
    return plain.eval(), flex.eval()


def _rope(positions):
    inv = 1.0 / (10000 ** (torch.arange(0, CONFIG.head_dim, 2).float() / CONFIG.head_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


class GivenSelection(SelectionStrategy):
    """Returns a fixed (B, R, G, G) mask, whatever the map."""

    def __init__(self, mask):
        self.mask = mask

    def select(self, attn_map, ctx):
        return self.mask


def _state(b, features, hr_cos, hr_sin, mask, alpha=1.0, kv_mode="lazy"):
    return HighResState(
        features, hr_cos, hr_sin, lr_index=torch.zeros(b, G_LR * G_LR, dtype=torch.long),
        lr_valid=torch.ones(b, G_LR, G_LR, dtype=torch.bool), hr_valid=torch.ones(b, G_HR, G_HR, dtype=torch.bool),
        strategy=GivenSelection(mask.view(*mask.shape[:2], G_HR, G_HR)), alpha=alpha, kv_mode=kv_mode,
    )


def naive_flex(layer, x, key_valid, features, hr_cos, hr_sin, sel, alpha):
    """Per (sample, row) loops: softmax over [causal sequence keys ; selected HR keys], blended."""
    b, n, _ = x.shape
    h, hk, d = CONFIG.num_heads, CONFIG.kv_heads, CONFIG.head_dim
    cos, sin = _rope(torch.arange(n).expand(b, n))
    q = apply_rope(layer.q_proj(x).view(b, n, h, d).transpose(1, 2), cos, sin)
    k = apply_rope(layer.k_proj(x).view(b, n, hk, d).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(b, n, hk, d).transpose(1, 2)
    khr = apply_rope(layer.k_hr_proj(features).view(b, -1, hk, d).transpose(1, 2), hr_cos, hr_sin)
    vhr = layer.v_hr_proj(features).view(b, -1, hk, d).transpose(1, 2)
    out = torch.zeros(b, h, n, d)
    plain_maps = {}
    for bi in range(b):
        for t in range(n):
            seq_ok = torch.tensor([j <= t and (bool(key_valid[bi, j]) or j == t) for j in range(n)])
            for hh in range(h):
                g = hh // (h // hk)
                s = (k[bi, g] @ q[bi, hh, t]) / math.sqrt(d)
                s = s.masked_fill(~seq_ok, float("-inf"))
                plain = s.softmax(-1)
                plain_maps[(bi, t, hh)] = plain
                o_plain = plain @ v[bi, g]
                chosen = sel[bi, t]
                if chosen.any():
                    shr = (khr[bi, g, chosen] @ q[bi, hh, t]) / math.sqrt(d)
                    p = torch.cat((s, shr)).softmax(-1)
                    o_hier = p[:n] @ v[bi, g] + p[n:] @ vhr[bi, g, chosen]
                    out[bi, hh, t] = (1 - alpha) * o_plain + alpha * o_hier
                else:
                    out[bi, hh, t] = o_plain
    return layer.o_proj(out.transpose(1, 2).flatten(2)), plain_maps


def _select(state, rows, b, n):
    """The state's selection for layer 1, from a dummy map (GivenSelection ignores it)."""
    state.start_step(rows)
    dummy = torch.zeros(b, CONFIG.num_heads, rows.rows.shape[1], n)
    return state.select(1, dummy)


def _run_flex(layer, x, key_valid, features, hr_cos, hr_sin, sel, alpha, row_mask=None, impl="fused",
              kv_mode="lazy"):
    """flex_attention over the whole chunk (the fused path for several rows). -> (out, rows, probs)."""
    b, n, _ = x.shape
    row_mask = sel.any(-1) if row_mask is None else row_mask
    inputs = build_attention_inputs(*_rope(torch.arange(n).expand(b, n)), 0, key_valid)
    rows = SelectingRows.from_mask(row_mask, inputs)
    row_sel = torch.stack([sel[i, rows.rows[i]] for i in range(b)]) & rows.valid[..., None]
    state = _state(b, features, hr_cos, hr_sin, row_sel, alpha, kv_mode)
    selection = _select(state, rows, b, n)
    out, probs = FLEX_IMPLS[impl](layer, x, inputs, None, rows, selection, state, need_map=True)
    return out, rows, probs


def _check_maps(rows, probs, plain_maps):
    """The map handed to the next layer is the plain, sequence-only softmax of each selecting row."""
    for bi in range(rows.rows.shape[0]):
        for ri in range(rows.rows.shape[1]):
            if rows.valid[bi, ri]:
                for hh in range(CONFIG.num_heads):
                    ref = plain_maps[(bi, int(rows.rows[bi, ri]), hh)]
                    assert torch.allclose(probs[bi, hh, ri], ref, atol=1e-6)


def _reference_case(alpha):
    _, flex = _layer()
    torch.manual_seed(1)
    b, n, m = 3, 7, G_HR * G_HR
    x = torch.randn(b, n, CONFIG.hidden_size)
    features = torch.randn(b, m, CONFIG.hidden_size)
    hr_cos, hr_sin = _rope(torch.rand(b, m) * n)
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[2, :2] = False  # the third sample is left-padded
    with torch.no_grad():  # W_K' != W_K, so the HR projections really are separate
        flex.k_hr_proj.weight.add_(0.5 * torch.randn_like(flex.k_hr_proj.weight))
    sel = torch.zeros(b, n, m, dtype=torch.bool)
    sel[0, 6, [1, 2, 5]] = True  # different counts per row and sample
    sel[0, 4, 0:9] = True
    sel[1, 6, 15] = True
    sel[2, 5, ::2] = True
    sel[2, 6, 3] = True
    with torch.no_grad():
        expected, plain_maps = naive_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, alpha)
    return flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps


@pytest.mark.parametrize("impl", ["fused", "release"])
@pytest.mark.parametrize("grad", [False, True])  # no grad: K/V from the inference buffers
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_matches_naive_reference_batched_with_padding(alpha, grad, impl):
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps = _reference_case(alpha)
    with torch.set_grad_enabled(grad):
        got, rows, probs = _run_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, alpha, impl=impl)
    assert (got - expected).abs().max() < 1e-5
    _check_maps(rows, probs, plain_maps)


@pytest.mark.parametrize("kv_mode", ["lazy", "prefill"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_decoding_step_matches_naive_reference(alpha, kv_mode):
    """The last row computed alone after a KV cache of the others (the eager single-row path)."""
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps = _reference_case(alpha)
    b, n, _ = x.shape
    cos, sin = _rope(torch.arange(n).expand(b, n))
    cache = KVCache()
    with torch.no_grad():
        flex(x[:, :-1], build_attention_inputs(cos[:, :-1], sin[:, :-1], 0, key_valid[:, :-1]), cache)
        inputs = build_attention_inputs(cos[:, -1:], sin[:, -1:], n - 1, key_valid)
        rows = SelectingRows.from_mask(torch.ones(b, 1, dtype=torch.bool), inputs)
        state = _state(b, features, hr_cos, hr_sin, sel[:, -1:], alpha, kv_mode)
        selection = _select(state, rows, b, n)
        got, probs = flex_attention(flex, x[:, -1:], inputs, cache, rows, selection, state, need_map=True)
    assert (got[:, 0] - expected[:, -1]).abs().max() < 1e-5
    for bi in range(b):
        for hh in range(CONFIG.num_heads):
            assert torch.allclose(probs[bi, hh, 0], plain_maps[(bi, n - 1, hh)], atol=1e-6)


def test_nothing_selected_equals_plain_self_attention():
    plain, flex = _layer()
    b, n, m = 2, 6, G_HR * G_HR
    x = torch.randn(b, n, CONFIG.hidden_size)
    sel = torch.zeros(b, n, m, dtype=torch.bool)
    rows = torch.zeros(b, n, dtype=torch.bool)
    rows[:, 2:] = True  # these rows go through the hierarchical path, with an empty selection
    features = torch.randn(b, m, CONFIG.hidden_size)
    with torch.no_grad():
        got, _, _ = _run_flex(flex, x, None, features, *_rope(torch.zeros(b, m)), sel, 1.0, row_mask=rows)
    inputs = build_attention_inputs(*_rope(torch.arange(n).expand(b, n)), 0, None)
    with torch.no_grad():
        expected = plain(x, inputs)
    assert (got - expected).abs().max() < 1e-6


def test_everything_selected_equals_attention_over_concatenated_keys():
    """With W_K' = W_K, W_V' = W_V and all HR tokens selected, a selecting row attends to
    [its causal sequence tokens ; all HR tokens] like ordinary attention over the concatenation."""
    _, flex = _layer()
    b, n, m = 2, 5, G_HR * G_HR
    x = torch.randn(b, n, CONFIG.hidden_size)
    features = torch.randn(b, m, CONFIG.hidden_size)
    hr_pos = torch.arange(m).expand(b, m) - m  # HR positions just before the sequence (RoPE is relative)
    sel = torch.zeros(b, n, m, dtype=torch.bool)
    sel[:, -1] = True
    with torch.no_grad():
        got, _, _ = _run_flex(flex, x, None, features, *_rope(hr_pos), sel, 1.0)
    # reference: the last row of plain causal attention over the HR tokens followed by the sequence
    plain = Attention(CONFIG, layer_idx=1).eval()
    plain.load_state_dict({k: v for k, v in flex.state_dict().items() if "hr" not in k})
    seq = torch.cat((features, x), dim=1)
    inputs = build_attention_inputs(*_rope(torch.arange(n + m).expand(b, n + m)), 0, None)
    with torch.no_grad():
        full = plain(seq, inputs)
    assert (got[:, -1] - full[:, -1]).abs().max() < 1e-5


def test_interpolated_rope_keeps_corners_and_shape():
    cos, sin = _rope(torch.arange(4).expand(1, 4) + 3)
    hr_cos, hr_sin = interpolate_rope(cos, sin, 2, 4)
    assert hr_cos.shape == (1, 16, CONFIG.head_dim)
    # bicubic interpolation of a constant map stays constant
    c = torch.ones(1, 4, 8)
    assert torch.allclose(interpolate_rope(c, c, 2, 6)[0], torch.ones(1, 36, 8), atol=1e-5)


def test_selecting_rows_from_mask():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    inputs = build_attention_inputs(*_rope(torch.arange(5).expand(3, 5)), 0, None)
    packed = SelectingRows.from_mask(mask, inputs)
    rows, valid = packed.rows, packed.valid
    assert rows.shape == (3, 3)
    assert rows[0].tolist() == [1, 3, 4] and valid[0].tolist() == [True, True, True]
    assert rows[1, 0] == 4 and valid[1].tolist() == [True, False, False]
    assert not valid[2].any()


def test_high_res_projections_computed_once_per_layer_and_token():
    _, flex = _layer()
    b, m = 1, G_HR * G_HR
    features = torch.randn(b, m, CONFIG.hidden_size)
    state = HighResState(features, *_rope(torch.zeros(b, m)), torch.zeros(b, 4, dtype=torch.long),
                         torch.ones(b, 2, 2, dtype=torch.bool), torch.ones(b, 4, 4, dtype=torch.bool), AllSelection())
    calls = []
    flex.k_hr_proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))

    def tokens(ids):
        t = torch.tensor([ids])
        return Selection(t, torch.ones_like(t, dtype=torch.bool), torch.ones(1, 1, len(ids), dtype=torch.bool))

    with torch.no_grad():
        first = state.high_res_kv(flex, tokens([0, 1, 2, 3, 4]))
        second = state.high_res_kv(flex, tokens([3, 4, 5, 6, 7, 8]))
        k_all, _ = flex.project_high_res(features, state.cos, state.sin)
    assert calls == [5, 4, 1]  # tokens 3 and 4 are reused, not projected again (then 1 batch of 16)
    assert torch.allclose(first.k, k_all[:, :, :5], atol=1e-6)
    assert torch.allclose(second.k, k_all[:, :, 3:9], atol=1e-6)


def test_prefill_mode_projects_every_token_once():
    _, flex = _layer()
    b, m = 2, G_HR * G_HR
    features = torch.randn(b, m, CONFIG.hidden_size)
    state = HighResState(features, *_rope(torch.zeros(b, m)), torch.zeros(b, 4, dtype=torch.long),
                         torch.ones(b, 2, 2, dtype=torch.bool), torch.ones(b, 4, 4, dtype=torch.bool), AllSelection(),
                         kv_mode="prefill")
    calls = []
    flex.k_hr_proj.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    t = torch.tensor([[1, 2], [0, 5]])
    selection = Selection(t, torch.ones_like(t, dtype=torch.bool), torch.ones(b, 1, 2, dtype=torch.bool))
    with torch.no_grad():
        state.high_res_kv(flex, selection)
        state.high_res_kv(flex, selection)
    assert calls == [(b, m, CONFIG.hidden_size)]


def test_unknown_kv_mode_is_rejected():
    with pytest.raises(ValueError, match="lazy"):
        _state(1, torch.zeros(1, 16, CONFIG.hidden_size), torch.zeros(1, 16, 8), torch.zeros(1, 16, 8),
               torch.zeros(1, 1, 16, dtype=torch.bool), kv_mode="eager")
