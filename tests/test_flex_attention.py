"""FlexAttention against a naive eager implementation of docs/method.md, section 4."""

import math
import warnings

import pytest
import torch

from flexvlm.attention import EagerAttention, LseUnavailable, build_backend
from flexvlm.models.decoder import KVCache, apply_rope, build_attention_inputs
from flexvlm.models.flex_attention import (
    FlexAttention, HighResKVCache, HighResSelector, MapRequest, SelectingRows, Selection, fused_attention,
    hierarchical_attention,
)
from flexvlm.models.geometry import interpolate_rope, square_layout
from flexvlm.models.gemma import GemmaConfig
from flexvlm.models.llm import Attention, LlamaConfig
from flexvlm.models.qwen2 import Qwen2Config
from flexvlm.selection import SelectionStrategy

SIZES = dict(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
CONFIG = LlamaConfig(**SIZES)
# every family's attention: LLaMA's, Qwen2's q/k/v bias (W_K', W_V' copy it), Gemma's own head size
FAMILY_CONFIGS = {"llama": CONFIG, "qwen2": Qwen2Config(**SIZES), "gemma": GemmaConfig(**SIZES, head_size=12)}
G_LR, G_HR = 2, 4  # low-res 2 x 2, high-res 4 x 4 = 16 HR tokens
# where each sample's low-res image tokens start in _reference_case's sequence of 7 (the map's keys): the
# first sample's last two are not seen by its row 4, the third's first is left padding
LR_START = torch.tensor([3, 0, 1])
LR_INDEX = LR_START[:, None] + torch.arange(G_LR * G_LR)


def _layer(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    plain = Attention(config, layer_idx=1)
    flex = FlexAttention(plain)
    return plain.eval(), flex.eval()


def _rope(positions, head_dim=CONFIG.head_dim):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


class GivenSelection(SelectionStrategy):
    """Returns a fixed (B, R, G, G) mask, and key bias if given, whatever the map."""

    def __init__(self, mask, bias=None):
        self.mask, self.bias = mask, bias

    def select(self, attn_map, ctx):
        return self.mask

    def key_bias(self, attn_map, ctx):
        return self.bias


def _high_res(b, features, hr_cos, hr_sin, mask, kv_mode="lazy", bias=None, impl="fused"):
    """The K/V cache and the selector of a GivenSelection of ``mask`` (B, R, M)."""
    grid = (*mask.shape[:2], G_HR, G_HR)
    strategy = GivenSelection(mask.view(grid), None if bias is None else bias.view(grid))
    layout = _layout(b)
    kv = HighResKVCache(features, hr_cos, hr_sin, layout.hr_valid.flatten(1), kv_mode)
    return kv, HighResSelector(strategy, layout, every_token_keys=impl == "release")


def _layout(b, lr=G_LR, hr=G_HR):
    return square_layout(torch.ones(b, lr, lr, dtype=torch.bool), torch.ones(b, hr, hr, dtype=torch.bool))


def naive_flex(layer, x, key_valid, features, hr_cos, hr_sin, sel, alpha, bias=None):
    """Per (sample, row) loops: softmax over [causal sequence keys ; selected HR keys], blended; a soft
    selection's ``bias`` (B, N, M) added to the selected HR keys' scores."""
    b, n, _ = x.shape
    h, hk, d = layer.attention.num_heads, layer.attention.num_kv_heads, layer.attention.head_dim
    cos, sin = _rope(torch.arange(n).expand(b, n), d)
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
                    if bias is not None:
                        shr = shr + bias[bi, t, chosen]
                    p = torch.cat((s, shr)).softmax(-1)
                    o_hier = p[:n] @ v[bi, g] + p[n:] @ vhr[bi, g, chosen]
                    out[bi, hh, t] = (1 - alpha) * o_plain + alpha * o_hier
                else:
                    out[bi, hh, t] = o_plain
    return layer.o_proj(out.transpose(1, 2).flatten(2)), plain_maps


def _select(selector, rows, b):
    """The selector's selection for layer 1, from a dummy map (GivenSelection ignores it)."""
    return selector.select(1, torch.zeros(b, rows.rows.shape[1], G_LR, G_LR), rows)[0]


def _run_flex(layer, x, key_valid, features, hr_cos, hr_sin, sel, alpha, row_mask=None, impl="fused",
              kv_mode="lazy", bias=None, lr_start=None):
    """hierarchical_attention over the whole chunk (the fused path for several rows), its map read
    from ``lr_start`` on (default: the first positions). -> (out, rows, map)."""
    b, n, _ = x.shape
    lr_start = torch.zeros(b, dtype=torch.long) if lr_start is None else lr_start
    row_mask = sel.any(-1) if row_mask is None else row_mask
    inputs = build_attention_inputs(*_rope(torch.arange(n).expand(b, n), layer.attention.head_dim), 0, key_valid)
    rows = SelectingRows.from_mask(row_mask, inputs)
    row_sel = torch.stack([sel[i, rows.rows[i]] for i in range(b)]) & rows.valid[..., None]
    row_bias = None if bias is None else torch.stack([bias[i, rows.rows[i]] for i in range(b)])
    kv, selector = _high_res(b, features, hr_cos, hr_sin, row_sel, kv_mode, row_bias, impl)
    selection = _select(selector, rows, b)
    out, attn_map = hierarchical_attention(layer, x, inputs, None, rows, selection, kv, alpha,
                                           MapRequest(lr_start, (G_LR, G_LR)), impl)
    return out, rows, attn_map


def _naive_low_res_map(plain_maps, bi, t, heads):
    """Row t of sample bi: its plain softmax summed over heads, on the low-res image keys (LR_INDEX)."""
    return sum(plain_maps[(bi, t, hh)] for hh in range(heads))[LR_INDEX[bi]].view(G_LR, G_LR)


def _check_maps(rows, attn_map, plain_maps, heads=CONFIG.num_heads):
    """The map handed to the next layer is the plain, sequence-only softmax of each selecting row,
    summed over heads, on the low-res image keys."""
    for bi in range(rows.rows.shape[0]):
        for ri in range(rows.rows.shape[1]):
            if rows.valid[bi, ri]:
                ref = _naive_low_res_map(plain_maps, bi, int(rows.rows[bi, ri]), heads)
                torch.testing.assert_close(attn_map[bi, ri], ref, atol=1e-6, rtol=1e-5)


def _reference_case(alpha, config=CONFIG, soft=False):
    _, flex = _layer(config=config)
    torch.manual_seed(1)
    b, n, m = 3, 7, G_HR * G_HR
    x = torch.randn(b, n, config.hidden_size)
    features = torch.randn(b, m, config.hidden_size)
    hr_cos, hr_sin = _rope(torch.rand(b, m) * n, config.head_dim)
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[2, :2] = False  # the third sample is left-padded
    with torch.no_grad():  # W_K' != W_K, so the HR projections really are separate
        flex.k_hr_proj.weight.add_(0.5 * torch.randn_like(flex.k_hr_proj.weight))
        if config.attention_bias:  # and so are their biases
            flex.v_hr_proj.bias.add_(0.5 * torch.randn_like(flex.v_hr_proj.bias))
    sel = torch.zeros(b, n, m, dtype=torch.bool)
    sel[0, 6, [1, 2, 5]] = True  # different counts per row and sample
    sel[0, 4, 0:9] = True
    sel[1, 6, 15] = True
    sel[2, 5, ::2] = True
    sel[2, 6, 3] = True
    bias = -3 * torch.rand(b, n, m) if soft else None  # a soft selection's log-weights, <= 0
    with torch.no_grad():
        expected, plain_maps = naive_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, alpha, bias)
    return flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps, bias


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
@pytest.mark.parametrize("impl", ["fused", "release"])
@pytest.mark.parametrize("grad", [False, True])  # no grad: K/V from the inference buffers
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_matches_naive_reference_batched_with_padding(alpha, grad, impl, family):
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps, _ = _reference_case(
        alpha, FAMILY_CONFIGS[family])
    with torch.set_grad_enabled(grad):
        got, rows, attn_map = _run_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, alpha, impl=impl,
                                        lr_start=LR_START)
    assert (got - expected).abs().max() < 1e-5
    _check_maps(rows, attn_map, plain_maps, FAMILY_CONFIGS[family].num_heads)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
@pytest.mark.parametrize("grad", [False, True])
def test_soft_selection_adds_its_key_bias_to_the_selected_scores(grad, family):
    """A soft selection (``key_bias``) through the fused several-row path: the naive loops with the
    bias added to each row's selected HR scores."""
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps, bias = _reference_case(
        1.0, FAMILY_CONFIGS[family], soft=True)
    with torch.set_grad_enabled(grad):
        got, rows, attn_map = _run_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, 1.0, bias=bias,
                                        lr_start=LR_START)
    assert (got - expected).abs().max() < 1e-5
    _check_maps(rows, attn_map, plain_maps, FAMILY_CONFIGS[family].num_heads)
    binary, _ = naive_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, 1.0)
    assert (got - binary).abs().max() > 1e-3  # the bias really changes the rows that select


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("kv_mode", ["lazy", "prefill"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_decoding_step_matches_naive_reference(alpha, kv_mode, soft, family):
    """The last row computed alone after a KV cache of the others (a decoding step: its HR keys merged
    with its sequence attention through the two log-sum-exps), with a binary and a soft selection."""
    config = FAMILY_CONFIGS[family]
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps, bias = _reference_case(alpha, config, soft)
    b, n, _ = x.shape
    cos, sin = _rope(torch.arange(n).expand(b, n), config.head_dim)
    cache = KVCache()
    with torch.no_grad():
        flex(x[:, :-1], build_attention_inputs(cos[:, :-1], sin[:, :-1], 0, key_valid[:, :-1]), cache)
        inputs = build_attention_inputs(cos[:, -1:], sin[:, -1:], n - 1, key_valid)
        rows = SelectingRows.from_mask(torch.ones(b, 1, dtype=torch.bool), inputs)
        kv, selector = _high_res(b, features, hr_cos, hr_sin, sel[:, -1:], kv_mode,
                                 None if bias is None else bias[:, -1:])
        selection = _select(selector, rows, b)
        got, attn_map = hierarchical_attention(flex, x[:, -1:], inputs, cache, rows, selection, kv, alpha,
                                               MapRequest(LR_START, (G_LR, G_LR)))
    assert (got[:, 0] - expected[:, -1]).abs().max() < 1e-5
    for bi in range(b):
        torch.testing.assert_close(attn_map[bi, 0], _naive_low_res_map(plain_maps, bi, n - 1, config.num_heads),
                                   atol=1e-6, rtol=1e-5)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                             reason="needs a CUDA device (scripts/gpu_check.sh)")]
# the backends that give a log-sum-exp, where they give it
LSE_BACKENDS = [("eager", "cpu"), ("sdpa", "cpu"), pytest.param("sdpa", "cuda", marks=CUDA),
                pytest.param("flex", "cuda", marks=CUDA)]


@pytest.mark.parametrize("name, device", LSE_BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_map_from_the_kernels_lse_is_the_softmax_map(grad, name, device):
    """The selecting rows' map from the fused call's log-sum-exp and the small matmul over the low-res
    image keys is the head-summed softmax of hand-built q / k (per-row loops): several rows, a batch
    with left and right padding, grouped-query heads, through each backend that gives an lse. It
    carries no gradient (none is asked), no fallback warns, and the output is plain attention's."""
    torch.manual_seed(0)
    attn = Attention(CONFIG, layer_idx=1)
    attn.backend = build_backend(name)
    b, n, h, hk, d = 3, 7, CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[2, :2] = False  # left padding
    key_valid[1, 6] = False  # right padding
    row_mask = torch.zeros(b, n, dtype=torch.bool)
    row_mask[0, [4, 6]] = row_mask[1, 5] = row_mask[2, [3, 5, 6]] = True  # 2, 1, 3 rows
    inputs = build_attention_inputs(*(t.to(device) for t in _rope(torch.arange(n).expand(b, n))), 0,
                                    key_valid.to(device))
    rows = SelectingRows.from_mask(row_mask.to(device), inputs)
    on_device = [t.to(device).requires_grad_(grad) for t in (q, k, v)]
    with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        out, attn_map = fused_attention(attn, *on_device, inputs, rows, None, 1.0,
                                        MapRequest(LR_START.to(device), (G_LR, G_LR)))
    assert not warned and not attn_map.requires_grad
    for bi in range(b):
        for t in range(n):
            seen = torch.tensor([j <= t and (bool(key_valid[bi, j]) or j == t) for j in range(n)])
            plain = []
            for hh in range(h):
                g = hh // (h // hk)
                p = ((k[bi, g] @ q[bi, hh, t]) / math.sqrt(d)).masked_fill(~seen, float("-inf")).softmax(-1)
                plain.append(p)
                torch.testing.assert_close(out[bi, hh, t].detach().cpu(), p @ v[bi, g], atol=1e-5, rtol=1e-5)
            if row_mask[bi, t]:
                ri = int(rows.rows[bi].tolist().index(t))
                expected = torch.stack(plain).sum(0)[LR_INDEX[bi]].view(G_LR, G_LR)
                torch.testing.assert_close(attn_map[bi, ri].cpu(), expected, atol=1e-5, rtol=1e-5)


class RefusesLse(EagerAttention):
    """The reference kernel, refusing the log-sum-exp (as flex_attention does on CPU)."""

    name = "refuses_lse"

    def __call__(self, q, k, v, mask=None, is_causal=False, return_lse=False):
        if return_lse:
            raise LseUnavailable("this kernel gives no log-sum-exp")
        return super().__call__(q, k, v, mask, is_causal)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_a_backend_without_lse_falls_back_to_the_eager_maps_with_a_warning(soft, grad):
    """A backend that refuses the lse: several rows and a decoding step give the naive loops' outputs
    and maps all the same, and say why once (the default warning filter shows the message once)."""
    flex, x, key_valid, features, hr_cos, hr_sin, sel, expected, plain_maps, bias = _reference_case(0.3, soft=soft)
    flex.attention.backend = RefusesLse()
    b, n, _ = x.shape
    with warnings.catch_warnings(record=True) as warned, torch.set_grad_enabled(grad):
        warnings.simplefilter("default")
        got, rows, attn_map = _run_flex(flex, x, key_valid, features, hr_cos, hr_sin, sel, 0.3, bias=bias,
                                        lr_start=LR_START)
        cos, sin = _rope(torch.arange(n).expand(b, n))
        cache = KVCache()
        flex(x[:, :-1], build_attention_inputs(cos[:, :-1], sin[:, :-1], 0, key_valid[:, :-1]), cache)
        inputs = build_attention_inputs(cos[:, -1:], sin[:, -1:], n - 1, key_valid)
        last = SelectingRows.from_mask(torch.ones(b, 1, dtype=torch.bool), inputs)
        kv, selector = _high_res(b, features, hr_cos, hr_sin, sel[:, -1:], bias=None if bias is None else bias[:, -1:])
        step, step_map = hierarchical_attention(flex, x[:, -1:], inputs, cache, last, _select(selector, last, b), kv,
                                                0.3, MapRequest(LR_START, (G_LR, G_LR)))
    assert [str(w.message) for w in warned] == [
        "this kernel gives no log-sum-exp. FlexAttention's selecting maps are therefore formed from the rows' "
        "scores over every key (the same maps, at a higher cost)"]
    assert (got - expected).abs().max() < 1e-5 and (step[:, 0] - expected[:, -1]).abs().max() < 1e-5
    _check_maps(rows, attn_map, plain_maps)
    for bi in range(b):
        torch.testing.assert_close(step_map[bi, 0], _naive_low_res_map(plain_maps, bi, n - 1, CONFIG.num_heads),
                                   atol=1e-6, rtol=1e-5)


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


def test_wraps_the_family_attention_under_its_names():
    """The family's projections keep their names (one state dict fits a plain and a FlexAttention layer)
    and are the wrapped attention's own modules, also when one is replaced; W_K', W_V' start as copies
    of W_K, W_V, bias included; train / eval reach the wrapped attention; on the meta device nothing is
    copied."""
    plain = Attention(FAMILY_CONFIGS["qwen2"], layer_idx=1)
    flex = FlexAttention(plain)
    projections = [f"{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")] + ["o_proj.weight"]
    high_res = [f"{p}_hr_proj.{t}" for p in "kv" for t in ("weight", "bias")]
    assert [name for name, _ in flex.named_parameters()] == projections + high_res
    assert flex.q_proj is plain.q_proj and flex.attention is plain
    for which in "kv":
        source, copied = getattr(plain, f"{which}_proj"), getattr(flex, f"{which}_hr_proj")
        assert torch.equal(copied.weight, source.weight) and torch.equal(copied.bias, source.bias)
        assert copied.weight.data_ptr() != source.weight.data_ptr()  # a copy, trained apart
    flex.eval()
    assert not plain.training
    flex.train()
    assert plain.training
    flex.q_proj = torch.nn.Linear(32, 4 * 8)  # e.g. a LoRA wrapper put in by name
    assert plain.q_proj is flex.q_proj
    with torch.device("meta"):
        on_meta = FlexAttention(Attention(FAMILY_CONFIGS["gemma"], layer_idx=0))
    assert all(p.is_meta for p in on_meta.parameters()) and on_meta.k_hr_proj.weight.shape == (2 * 12, 32)


def test_interpolated_rope_keeps_corners_and_shape():
    cos, sin = _rope(torch.arange(4).expand(1, 4) + 3)
    hr_cos, hr_sin = interpolate_rope(cos, sin, (2, 2), (4, 4))
    assert hr_cos.shape == (1, 16, CONFIG.head_dim)
    # bicubic interpolation of a constant map stays constant
    c = torch.ones(1, 4, 8)
    assert torch.allclose(interpolate_rope(c, c, (2, 2), (6, 6))[0], torch.ones(1, 36, 8), atol=1e-5)


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
    kv = HighResKVCache(features, *_rope(torch.zeros(b, m)), torch.ones(b, m, dtype=torch.bool))
    calls = []
    flex.k_hr_proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))

    def tokens(ids):
        t = torch.tensor([ids])
        return Selection(t, torch.ones_like(t, dtype=torch.bool), torch.ones(1, 1, len(ids), dtype=torch.bool))

    with torch.no_grad():
        first = kv.keys_values(flex, tokens([0, 1, 2, 3, 4]))
        second = kv.keys_values(flex, tokens([3, 4, 5, 6, 7, 8]))
        k_all, _ = flex.project_high_res(features, kv.cos, kv.sin)
    assert calls == [5, 4, 1]  # tokens 3 and 4 are reused, not projected again (then 1 batch of 16)
    assert torch.allclose(first.k, k_all[:, :, :5], atol=1e-6)
    assert torch.allclose(second.k, k_all[:, :, 3:9], atol=1e-6)


def test_prefill_mode_projects_every_token_once():
    _, flex = _layer()
    b, m = 2, G_HR * G_HR
    features = torch.randn(b, m, CONFIG.hidden_size)
    kv = HighResKVCache(features, *_rope(torch.zeros(b, m)), torch.ones(b, m, dtype=torch.bool), kv_mode="prefill")
    calls = []
    flex.k_hr_proj.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    t = torch.tensor([[1, 2], [0, 5]])
    selection = Selection(t, torch.ones_like(t, dtype=torch.bool), torch.ones(b, 1, 2, dtype=torch.bool))
    with torch.no_grad():
        kv.keys_values(flex, selection)
        kv.keys_values(flex, selection)
    assert calls == [(b, m, CONFIG.hidden_size)]


def test_unknown_kv_mode_is_rejected():
    with pytest.raises(ValueError, match="lazy"):
        HighResKVCache(torch.zeros(1, 16, CONFIG.hidden_size), torch.zeros(1, 16, 8), torch.zeros(1, 16, 8),
                       torch.ones(1, 16, dtype=torch.bool), kv_mode="eager")
