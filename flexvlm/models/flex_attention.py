"""Hierarchical self-attention (FlexAttention, ECCV 2024), in one place.

A FlexAttention layer is a decoder attention layer whose *selecting* query rows (the rows that
predict answer tokens in training, the current token at inference) also attend to a few high-res
(HR) tokens that never enter the sequence:

    K = [H W_K ; f_sel W_K'],  V = [H W_V ; f_sel W_V']     (W_K', W_V' new, initialised as copies)

The parts, each data in and data out; the decoder loop (``FlexVLM.decode``) joins them:

- ``flex_layer`` (``hierarchical_attention``): a layer's call, from its input, the selecting rows and
  their ``Selection`` -> its output and the selecting rows' map, from which the loop selects the next
  layer's tokens. q / k / v, the HR K/V and the output projection are shared by both ways of
  computing the attention (``FLEX_IMPLS``: ``fused``, and ``release``, the authors' way, a reference).
- ``HighResSelector``: a map -> the next layer's ``Selection`` and selection mask.
- ``HighResKVCache``: the HR tokens and each layer's projected HR K/V.
- ``SelectionRecord``: what the selections were (masks, maps, fractions), returned by the loop.

How the fused attention keeps the extra work to the selecting rows and the selected tokens
(docs/method.md, "Cost"):

- Every row goes through the fused kernel over the sequence, as in a plain layer; where a map or a
  merge (below) needs it, the kernel also returns each row's log-sum-exp (lse) over its sequence keys.
- The map that selects for the next layer is the selecting rows' plain softmax on the low-res image
  keys, exp(q K_img^T / sqrt(d) - lse): exact from that lse and one small matmul, no map formed.
- Without autograd (a generation's prefill and its decoding steps), the selecting rows attend to their
  HR keys alone in one more fused call, and the two softmaxes are merged through their lse's.
- With autograd (training), the kernels' lse has no gradient, so a merge could not be trained
  through: the selecting rows of a sample are scored in one more fused call against [their sequence
  keys ; the union of the HR tokens any of them selected], with a per-row mask. HR K/V are projected
  once per token of the union, so memory grows with the union, not with rows x selected tokens.
- A map that keeps its gradient (``MapRequest.grad``, for an objective on the maps) is formed from
  the rows' scores over every key: an lse with a gradient would take a second pass over the keys.
  So is every map, with a warning, on a backend that gives no lse.
- At inference the projected HR K/V of each layer live in buffers written in place, either lazily
  (only the tokens ever selected: best for short answers) or all at once at the first step
  ("prefill": best for long generations).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor, nn

from flexvlm.attention import LseUnavailable
from flexvlm.models.decoder import (
    AttentionInputs, DecoderAttention, DecoderLayer, KVCache, causal_key_mask, gather_rows,
)
from flexvlm.models.geometry import Shape, VisualLayout
from flexvlm.selection.base import SelectionContext, SelectionStrategy

# "static": prefill's buffers, gathered afresh at every step, nothing read back to the host (the compiled
# decode step's, ``flexvlm.models.static_decode``)
HIGH_RES_KV_MODES = ("lazy", "prefill", "static")


def selected_first(mask: Tensor, min_width: int = 0, width: int | None = None) -> tuple[Tensor, Tensor]:
    """(B, L) bool -> indices (B, K) of the True entries in ascending order, padded to the largest
    count K (at least ``min_width``), or to exactly ``width`` (no smaller than any count: a shape that
    reads nothing back), and valid (B, K)."""
    if width is None and mask.shape[0] == 1 and min_width == 0:  # one sample (batch-1 decoding): no padding
        idx = mask[0].nonzero().view(1, -1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    counts = mask.sum(-1)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 0, min_width)
    # a stable sort puts the True positions first, in ascending order
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    valid = torch.arange(width, device=mask.device) < counts.unsqueeze(-1)
    return idx, valid


@dataclass
class SelectingRows:
    """The query rows that select (or, for cross-attention, every row), as positions in the current
    chunk: ``rows`` (B, R), padded per sample, ``valid`` (B, R) marks the real ones, ``visible``
    (B, 1, R, keys) the sequence keys each row sees (causal and padding), shared by every layer."""

    rows: Tensor
    valid: Tensor
    visible: Tensor
    all_valid: bool  # no padded row

    @classmethod
    def from_mask(cls, row_mask: Tensor, inputs: AttentionInputs) -> "SelectingRows":
        """(B, N) bool over the current chunk -> the selecting rows; R >= 1."""
        rows, valid = selected_first(row_mask, min_width=1)
        visible = causal_key_mask(rows, inputs.past_len, inputs.key_valid, inputs.past_len + row_mask.shape[1])
        return cls(rows, valid, visible.unsqueeze(1), bool(valid.all()))


@dataclass(frozen=True)
class MapRequest:
    """What a layer's selecting map covers: each sample's h x w low-res image tokens, contiguous and
    row-major from key position ``lr_start`` (B,) on (docs/method.md, "Visual geometry"), ``lr_shape``
    (h, w); ``grad``: the map keeps its gradient (a training objective on where the model looks;
    otherwise it costs no memory in the backward pass)."""

    lr_start: Tensor
    lr_shape: Shape
    grad: bool = False

    @property
    def lr_index(self) -> Tensor:
        """(B, h*w): the key positions of the low-res image tokens."""
        h, w = self.lr_shape
        return self.lr_start[:, None] + torch.arange(h * w, device=self.lr_start.device)

    @cached_property
    def starts(self) -> list[int]:
        """``lr_start`` read to the host once, for slicing the keys at every layer and step."""
        return self.lr_start.tolist()


@dataclass
class Selection:
    """What one FA layer attends to beyond the sequence: the union of its sample's selected HR
    tokens, ``tokens`` (B, K) padded with ``valid`` (B, K), and ``row_mask`` (B, R, K): which of
    them each selecting row sees (None: every row sees every token, no padding). ``tokens`` None:
    every HR token of the image, K = M (cross-attention, the release-style layer, or a union that
    covers most of it). ``key_bias`` (B, R, K): what a soft selection adds to each row's scores of
    these keys (None: binary)."""

    tokens: Tensor | None
    valid: Tensor
    row_mask: Tensor | None
    key_bias: Tensor | None = None

    def rows_see(self, rows: int) -> Tensor:
        """``row_mask`` as a tensor, (B, rows, K)."""
        if self.row_mask is None:
            return self.valid[:, None].expand(-1, rows, -1)
        return self.row_mask.expand(-1, rows, -1)


@dataclass
class HighResKV:
    """Projected HR keys (with RoPE) and values of one layer, (B, kv_heads, K, d), and which key each
    query row sees, ``selection`` (see ``Selection.row_mask``)."""

    k: Tensor
    v: Tensor
    selection: Selection


class HighResSelector:
    """The selecting rows' map in one layer -> the HR tokens of the next, through a selection strategy,
    for one forward pass or one whole generation (the strategy's work that depends on the images only
    is done once, ``SelectionContext.memo``)."""

    def __init__(self, strategy: SelectionStrategy, layout: VisualLayout, every_token_keys: bool = False) -> None:
        """``layout``: the batch's geometry (``flexvlm.models.geometry``); ``every_token_keys``: every
        selection lists all HR tokens, with each row's own mask, for the release-style layer, which
        scores every HR key."""
        self.strategy, self.layout, self.every_token_keys = strategy, layout, every_token_keys
        self._base_context = SelectionContext(layout, layer=-1)
        self._contexts: dict[int, SelectionContext] = {}  # FA layer -> its context, sharing the memo
        # (B,) HR tokens a row can select: those of the image, or every one for a strategy that keeps
        # padding (whole blocks), so that a fraction never exceeds 1
        selectable = strategy.clip(torch.ones_like(layout.hr_valid)[:, None], self._base_context)
        self.available = selectable.flatten(1).sum(-1).clamp(min=1)
        self.width: int | None = None  # a fixed number of tokens per row's selection (``with_fixed_width``)

    def with_fixed_width(self) -> HighResSelector:
        """This selector with every row's selection padded to the most HR tokens a row can select (the
        strategy's ``max_selected``), so that no shape depends on the map: the compiled decode step's. A
        strategy whose count the map decides is refused (ValueError)."""
        width = self.strategy.max_selected(self._base_context)
        if width is None:
            raise ValueError(f"{self.strategy!r} selects as many high-res tokens as the map decides (a threshold or "
                             f"an adaptive mass): no fixed shape for a compiled decode step. Give the strategy a fixed "
                             f"budget (ratio or top_k), or decode uncompiled")
        fixed = copy.copy(self)  # the same contexts and memo
        fixed.width = width
        return fixed

    def select(self, layer_idx: int, attn_map: Tensor, rows: SelectingRows) -> tuple[Selection, Tensor]:
        """The ``rows``' low-res map (B, R, h, w) in layer ``layer_idx`` - 1 -> (the selection of layer
        ``layer_idx``, its mask (B, R, H, W) over the HR canvas, padded rows selecting nothing)."""
        ctx = self._context(layer_idx)
        mask = self.strategy(attn_map.detach(), ctx)
        bias = self.strategy.key_bias(attn_map.detach(), ctx)
        if not rows.all_valid:
            mask = mask & rows.valid[:, :, None, None]
        return self._laid_out(mask.flatten(2), bias), mask

    def _laid_out(self, flat: Tensor, bias: Tensor | None) -> Selection:
        """Each row's selection (B, R, M) as the keys a layer projects and the mask over them."""
        b, r, m = flat.shape
        if not self.every_token_keys:
            if r == 1:  # one row per sample (inference): the union is the row's own selection
                tokens, valid = selected_first(flat[:, 0], width=self.width)
                unpadded = b == 1 and self.width is None
                return Selection(tokens, valid, None if unpadded else valid[:, None], _on_tokens(bias, tokens))
            tokens, valid = selected_first(flat.any(1))
            if 4 * tokens.shape[1] < 3 * m:
                row_mask = flat.gather(-1, tokens[:, None].expand(-1, r, -1)) & valid[:, None]
                return Selection(tokens, valid, row_mask, _on_tokens(bias, tokens))
        # every token: the release-style layer scores them all; otherwise the union is most of the image,
        # and projecting every token costs little more than the union, and saves a copy of most of the
        # features for the backward pass
        return Selection(None, self.layout.hr_valid.flatten(1), flat, None if bias is None else bias.flatten(2))

    def _context(self, layer_idx: int) -> SelectionContext:
        if layer_idx not in self._contexts:
            self._contexts[layer_idx] = replace(self._base_context, layer=layer_idx)
        return self._contexts[layer_idx]


@dataclass
class SelectionRecord:
    """What the selecting ``rows`` of one forward pass selected, returned by the decoder loop: per FA
    layer, the selection ``masks`` (B, R, H, W) and the ``maps`` (B, R, h, w) that selected them (the
    head-summed low-res attention of the layer before, with its gradient where asked); ``available``
    (B,): the HR tokens a row can select (``HighResSelector.available``)."""

    rows: SelectingRows
    available: Tensor
    masks: dict[int, Tensor] = field(default_factory=dict)
    maps: dict[int, Tensor] = field(default_factory=dict)

    def add(self, layer_idx: int, attn_map: Tensor, mask: Tensor) -> None:
        self.maps[layer_idx], self.masks[layer_idx] = attn_map, mask

    def _row_counts(self) -> list[Tensor]:
        """Per FA layer, (B, R) the HR tokens each row selected."""
        return [mask.flatten(2).sum(-1) for mask in self.masks.values()]

    def selected_fraction(self) -> dict[int, Tensor]:
        """FA layer -> mean fraction of the image's HR tokens over the real selecting rows."""
        real = self.rows.valid
        if not real.any():
            return {}
        return {layer: (count / self.available[:, None])[real].mean()
                for layer, count in zip(self.masks, self._row_counts())}

    def row_fraction(self) -> Tensor | None:
        """(B, R) fraction of HR tokens each selecting row used, mean over FA layers."""
        if not self.masks:
            return None
        return torch.stack(self._row_counts()).float().mean(0) / self.available[:, None]

    def sample_fraction(self) -> Tensor | None:
        """(B,) mean fraction of HR tokens each sample's selecting rows used, over FA layers."""
        per_row = self.row_fraction()
        if per_row is None:
            return None
        real = self.rows.valid
        return (per_row * real).sum(-1) / real.sum(-1).clamp(min=1)


class HighResKVCache:
    """The HR tokens of one forward pass or one whole generation and each FA layer's projected keys
    and values of them."""

    def __init__(self, features: Tensor, cos: Tensor, sin: Tensor, valid: Tensor, kv_mode: str = "lazy") -> None:
        """features (B, M, D): projected HR tokens on the layout's canvas (M = H * W); cos / sin
        (B, M, d): their RoPE; valid (B, M): the tokens of the image; ``kv_mode``: how HR K/V are
        projected at inference, one of ``HIGH_RES_KV_MODES``."""
        if kv_mode not in HIGH_RES_KV_MODES:
            raise ValueError(f"unknown high-res K/V mode {kv_mode!r}; valid: {list(HIGH_RES_KV_MODES)}")
        self.features, self.cos, self.sin, self.valid, self.kv_mode = features, cos, sin, valid, kv_mode
        self._kv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> K, V buffers, projected (B, M)
        self._last: dict[int, tuple[Tensor, ...]] = {}  # layer -> tokens, valid, their K, V last gathered
        self._every: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> K, V of every token (cross-attention)

    def every_token(self) -> Selection:
        """Every HR token of the image, seen by every row (the cross-attention baseline)."""
        return Selection(None, self.valid, self.valid[:, None])

    def keys_values(self, attn: FlexAttention, selection: Selection) -> HighResKV:
        """The keys and values of ``attn``'s layer for the tokens of ``selection``. Under autograd
        they are projected afresh from the features (so nothing crosses a gradient-checkpointing
        boundary); at inference they come from the layer's buffers."""
        tokens = selection.tokens
        if torch.is_grad_enabled():
            if tokens is None:
                k, v = attn.project_high_res(self.features, self.cos, self.sin)
            else:
                k, v = attn.project_high_res(*(_gather_tokens(t, tokens) for t in (self.features, self.cos, self.sin)))
            return HighResKV(k, v, selection)
        layer = attn.attention.layer_idx
        if tokens is None:  # every token, kept in the layout attention reads
            if layer not in self._every:
                self._every[layer] = attn.project_high_res(self.features, self.cos, self.sin)
            return HighResKV(*self._every[layer], selection)
        if self.kv_mode == "static":  # no comparison with the last gather: nothing read back to the host
            return HighResKV(*self._gathered(attn, tokens, selection.valid), selection)
        last = self._last.get(layer)
        # a selection that stays put is gathered once (padded entries too: a token that turns valid
        # must have been projected, hence valid is compared as well)
        if last is None or not (torch.equal(last[0], tokens) and torch.equal(last[1], selection.valid)):
            last = (tokens, selection.valid, *self._gathered(attn, tokens, selection.valid))
            self._last[layer] = last
        return HighResKV(last[2], last[3], selection)

    def buffers(self) -> list[Tensor]:
        """The FA layers' buffers of projected HR K and V, those projected so far."""
        return [t for kv in (*self._kv.values(), *self._every.values()) for t in kv[:2]]

    def _gathered(self, attn: FlexAttention, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's K and V (B, kv_heads, K, d) of ``tokens`` (B, K)."""
        k_buf, v_buf = self._buffers(attn, tokens, valid)
        return tuple(_gather_tokens(buf, tokens).transpose(1, 2).contiguous() for buf in (k_buf, v_buf))

    @torch.no_grad()
    def _buffers(self, attn: FlexAttention, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M, kv_heads, d) K and V buffers of the layer with at least the valid ``tokens`` (B, K)
        projected; each (layer, token) pair is projected at most once per cache."""
        layer = attn.attention.layer_idx
        if layer not in self._kv:
            b, m, _ = self.features.shape
            if self.kv_mode != "lazy":  # every token, at the first call
                k, v = (t.transpose(1, 2).contiguous() for t in attn.project_high_res(self.features, self.cos, self.sin))
                self._kv[layer] = (k, v, self.features.new_ones(b, m, dtype=torch.bool))
                return k, v
            shape = (b, m, attn.attention.num_kv_heads, attn.attention.head_dim)
            self._kv[layer] = (self.features.new_zeros(shape), self.features.new_zeros(shape),
                               self.features.new_zeros(b, m, dtype=torch.bool))
        k_buf, v_buf, done = self._kv[layer]
        if self.kv_mode != "lazy":  # every token projected already
            return k_buf, v_buf
        todo = valid & ~done.gather(1, tokens)
        if todo.any():
            bi, ki = todo.nonzero(as_tuple=True)
            mi = tokens[bi, ki]
            k_new, v_new = attn.project_high_res(self.features[bi, mi], self.cos[bi, mi], self.sin[bi, mi])
            k_buf[bi, mi] = k_new  # written in place: no copy of the whole buffer
            v_buf[bi, mi] = v_new
            done[bi, mi] = True
        return k_buf, v_buf


@dataclass
class HighResInputs:
    """What the FA layers of one forward pass or one whole generation attend to beyond the sequence:
    the HR tokens and their K/V (``kv``); the ``selector`` of each layer's tokens from the map of the
    layer before (None: cross-attention, every row sees every HR token) and what those maps cover
    (``map_request``); ``alpha``: the selecting rows' output is plain + alpha (hierarchical - plain)."""

    kv: HighResKVCache
    selector: HighResSelector | None = None
    map_request: MapRequest | None = None
    alpha: float = 1.0


def low_res_map(probs: Tensor, lr_index: Tensor, lr_shape: Shape) -> Tensor:
    """Rows' softmax over the sequence keys (B, heads, R, keys) -> their head-summed attention on the
    h x w low-res image tokens at ``lr_index`` (B, h*w): (B, R, h, w), the map that selects."""
    b, _, r, _ = probs.shape
    return probs.sum(1).gather(-1, lr_index[:, None].expand(b, r, -1)).view(b, r, *lr_shape)


def map_from_lse(attn: DecoderAttention, q_rows: Tensor, k: Tensor, lse_rows: Tensor, visible: Tensor,
                 request: MapRequest) -> Tensor:
    """``low_res_map`` of the rows (B, heads, R, d) without their softmax over every key: its entries
    on the image keys are exp(q K_img^T / sqrt(d) - lse), exact with ``lse_rows`` (B, heads, R), each
    row's log-sum-exp over the keys it sees, ``visible`` (B, 1, R, keys). Without gradient."""
    (h, w), r = request.lr_shape, q_rows.shape[2]
    with torch.no_grad():
        # each sample's image keys are one slice of its keys: copied slice by slice, many times faster
        # than gathering them key by key
        image_keys = torch.stack([k[i, :, start:start + h * w] for i, start in enumerate(request.starts)])
        probs = torch.exp(attn.row_scores(q_rows, image_keys).float() - lse_rows.float().unsqueeze(-1)).sum(1)
        seen = visible[:, 0].gather(-1, request.lr_index[:, None].expand(-1, r, -1))  # unseen keys: no share
        return probs.masked_fill(~seen, 0).to(q_rows.dtype).view(-1, r, h, w)


def _on_tokens(bias: Tensor | None, tokens: Tensor) -> Tensor | None:
    """A per-token bias on the canvas (B, R, H, W) -> on the selection's ``tokens`` (B, K): (B, R, K)."""
    if bias is None:
        return None
    return bias.flatten(2).gather(-1, tokens[:, None].expand(-1, bias.shape[1], -1))


def _gather_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """x (B, M, ...), tokens (B, K) -> (B, K, ...): whole rows copied by index_select."""
    b, m = x.shape[:2]
    flat = tokens + torch.arange(b, device=tokens.device)[:, None] * m
    return x.flatten(0, 1).index_select(0, flat.flatten()).view(b, tokens.shape[1], *x.shape[2:])


class FlexAttention(nn.Module):
    """A decoder layer's attention (any family's ``DecoderAttention``, ``attention``) with the HR
    projections W_K', W_V'. Called as a module it is that attention; ``hierarchical_attention`` /
    ``cross_attention`` add the HR keys.

    It wraps the family's attention rather than subclassing one. Both hold one registry of child
    modules: parameter names stay the family's (``self_attn.k_proj.weight`` beside
    ``self_attn.k_hr_proj.weight``), so one checkpoint fits plain and FlexAttention layers, and a
    child replaced on this module (a LoRA or quantised layer) is the one the family's methods use.
    The attention itself is held unregistered, for its methods."""

    def __init__(self, attention: DecoderAttention) -> None:
        super().__init__()
        if [*attention.parameters(recurse=False), *attention.buffers(recurse=False)]:
            raise TypeError(f"{type(attention).__name__} holds tensors of its own; FlexAttention needs every "
                            f"parameter and buffer of a DecoderAttention in its child modules")
        self._modules = attention._modules  # the one registry (see above)
        object.__setattr__(self, "attention", attention)  # not registered: its modules are already ours
        # W_K', W_V' start as W_K, W_V (the paper's initialisation); on the meta device a copy costs nothing
        self.k_hr_proj = copy.deepcopy(attention.k_proj)
        self.v_hr_proj = copy.deepcopy(attention.v_proj)

    def train(self, mode: bool = True) -> FlexAttention:
        self.attention.train(mode)  # the unregistered attention's own flag follows
        return super().train(mode)

    @torch.no_grad()
    def init_high_res_projections(self) -> None:
        """W_K' <- W_K, W_V' <- W_V (again, e.g. once a model built on the meta device has memory)."""
        self.k_hr_proj.load_state_dict(self.attention.k_proj.state_dict())
        self.v_hr_proj.load_state_dict(self.attention.v_proj.state_dict())

    def project_high_res(self, features: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """HR features (..., n, D) with their RoPE (..., n, d) -> keys with RoPE and values without
        (as the release): (B, kv_heads, n, d) for batched input, (n, kv_heads, d) for a flat list."""
        k, v = self.attention.keys_values(features, cos, sin, self.k_hr_proj, self.v_hr_proj)
        if features.ndim == 2:  # a flat list of tokens, returned token-major
            return k.transpose(0, 1), v.transpose(0, 1)
        return k, v

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        return self.attention(x, inputs, cache)


def flex_layer(
    layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    selection: Selection | None, kv: HighResKVCache | None, alpha: float, map_request: MapRequest | None,
    impl: str = "fused",
) -> tuple[Tensor, Tensor | None]:
    """A decoder layer in flex mode (``hierarchical_attention``). -> (hidden states, the rows' map or None)."""
    out, attn_map = hierarchical_attention(layer.self_attn, layer.attention_input(x), inputs, cache, rows, selection,
                                           kv, alpha, map_request, impl)
    return layer.after_attention(x, out), attn_map


def cross_attention_layer(
    layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    kv: HighResKVCache,
) -> Tensor:
    """A decoder layer of the cross-attention baseline (see ``cross_attention``)."""
    return layer.after_attention(x, cross_attention(layer.self_attn, layer.attention_input(x), inputs, cache, rows, kv))


def _family_attention(layer_attn: DecoderAttention | FlexAttention) -> DecoderAttention:
    """The family's attention of a FlexAttention layer, or of the plain layer whose map seeds the
    first selection."""
    return layer_attn.attention if isinstance(layer_attn, FlexAttention) else layer_attn


def hierarchical_attention(
    layer_attn: DecoderAttention | FlexAttention, x: Tensor, inputs: AttentionInputs, cache: KVCache | None,
    rows: SelectingRows, selection: Selection | None, kv: HighResKVCache | None, alpha: float,
    map_request: MapRequest | None, impl: str = "fused",
) -> tuple[Tensor, Tensor | None]:
    """Self-attention in which the selecting ``rows`` also attend to their ``selection`` of HR tokens,
    their K/V from ``kv``, computed by ``FLEX_IMPLS[impl]``; ``selection`` None (and ``kv`` then unused):
    plain self-attention, as in the layer whose map seeds the first selection. -> (output (B, N, D),
    the rows' low-res map (B, R, h, w) for ``map_request``, or None without one)."""
    attn = _family_attention(layer_attn)
    q, k, v = attn.qkv(x, inputs, cache)
    high_res = kv.keys_values(layer_attn, selection) if selection is not None else None
    out, attn_map = FLEX_IMPLS[impl](attn, q, k, v, inputs, rows, high_res, alpha, map_request)
    return attn.output(out), attn_map


def fused_attention(
    attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, rows: SelectingRows,
    high_res: HighResKV | None, alpha: float, map_request: MapRequest | None,
) -> tuple[Tensor, Tensor | None]:
    """The attention of ``hierarchical_attention`` through fused kernels (module docstring): queries
    (B, heads, N, d) over the sequence's ``k``, ``v``, the selecting rows also over ``high_res``.
    -> (output (B, heads, N, d), the rows' map or None)."""
    # the kernels' lse has no gradient: under autograd the HR keys are attended together with the sequence
    # keys instead of merged in, and a map that keeps its gradient is formed from the rows' scores
    training = torch.is_grad_enabled()
    map_from_scores = map_request is not None and map_request.grad and training
    merge = high_res is not None and not training
    with_lse = merge or (map_request is not None and not map_from_scores)
    out, lse = _sequence_attention(attn, q, k, v, inputs, with_lse)
    q_rows = gather_rows(q, rows.rows)
    lse_rows = None if lse is None else lse.gather(2, rows.rows[:, None].expand(-1, lse.shape[1], -1))
    if high_res is not None:
        plain = gather_rows(out, rows.rows)
        if merge and lse_rows is not None:
            hier = _merged_with_high_res(attn, q_rows, plain, lse_rows, high_res)
        else:
            hier = _attend(attn, q_rows, k, v, rows.visible, high_res)
        out = _write_rows(out, plain + alpha * (hier - plain), rows)
    if map_request is None:
        return out, None
    if map_from_scores or lse_rows is None:
        probs = row_probs(attn, q_rows, k, rows.visible, map_request.grad)
        return out, low_res_map(probs, map_request.lr_index, map_request.lr_shape)
    return out, map_from_lse(attn, q_rows, k, lse_rows, rows.visible, map_request)


def _sequence_attention(attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs,
                        with_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Every row over its causal sequence keys, with each row's lse where asked and the backend gives
    one (else None, and the maps are formed eagerly)."""
    if not with_lse:
        return attn.sequence_attention(q, k, v, inputs)
    try:
        return attn.sequence_attention(q, k, v, inputs, return_lse=True)
    except LseUnavailable as refused:
        # the default warning filter shows it once: the same message from the same line
        warnings.warn(f"{refused}. FlexAttention's selecting maps are therefore formed from the rows' scores over "
                      f"every key (the same maps, at a higher cost)", stacklevel=2)
        return attn.sequence_attention(q, k, v, inputs)


def row_probs(attn: DecoderAttention, q_rows: Tensor, k: Tensor, visible: Tensor, map_grad: bool) -> Tensor:
    """The rows' plain softmax over the keys they see; with its gradient only when ``map_grad``."""
    with torch.set_grad_enabled(map_grad and torch.is_grad_enabled()):
        return attn.row_scores(q_rows, k).masked_fill(~visible, float("-inf")).softmax(-1)


def _high_res_mask(selection: Selection, sees: Tensor, dtype: torch.dtype) -> Tensor:
    """``sees`` (B, R, K), the HR keys each row sees, as a kernel's mask (B, 1, R, K): bool, or with a
    soft selection's key bias additive (the bias where seen, -inf elsewhere)."""
    if selection.key_bias is None:
        return sees.unsqueeze(1)
    return selection.key_bias.unsqueeze(1).to(dtype).masked_fill(~sees.unsqueeze(1), float("-inf"))


def _attend(
    attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, high_res: HighResKV
) -> Tensor:
    """Query rows (B, heads, R, d) over [their visible sequence keys ; the HR keys they see], fused."""
    hr_mask = _high_res_mask(high_res.selection, high_res.selection.rows_see(q.shape[2]), q.dtype)
    if hr_mask.dtype != torch.bool:  # a soft selection: the whole mask additive
        visible = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    keys, values = torch.cat((k, high_res.k), dim=2), torch.cat((v, high_res.v), dim=2)
    return attn.attend(q, keys, values, torch.cat((visible, hr_mask), dim=-1))[0]


def _merged_with_high_res(attn: DecoderAttention, q_rows: Tensor, plain: Tensor, lse_rows: Tensor,
                          high_res: HighResKV) -> Tensor:
    """The rows' (B, heads, R, d) output over [their sequence keys ; their HR keys], from its two
    parts: the ``plain`` output over the sequence with its lse, and one fused call over the HR keys
    alone. The HR keys' share of the whole softmax is exp(lse_hr) / (exp(lse_seq) + exp(lse_hr)),
    sigmoid(lse_hr - lse_seq). Without autograd only (the kernels' lse has no gradient)."""
    if high_res.k.shape[2] == 0:  # no sample selected a token
        return plain
    sees = high_res.selection.rows_see(q_rows.shape[2])
    hr_out, hr_lse = attn.attend(q_rows, high_res.k, high_res.v, _high_res_mask(high_res.selection, sees, q_rows.dtype),
                                 return_lse=True)
    # a row that sees no HR key keeps its plain output: the kernels' output and lse there are no softmax's
    seen = sees.any(-1)[:, None]  # (B, 1, R)
    share = torch.sigmoid(hr_lse.float() - lse_rows.float()).masked_fill(~seen, 0).unsqueeze(-1)
    hr_out = torch.where(seen.unsqueeze(-1), hr_out, plain)
    return (plain.float() + share * (hr_out.float() - plain.float())).to(plain.dtype)


def _write_rows(out: Tensor, row_out: Tensor, rows: SelectingRows) -> Tensor:
    """``out`` (B, heads, N, d) with the selecting rows' output (B, heads, R, d) in place of theirs;
    padded rows keep what they had."""
    if rows.all_valid:  # no padded row: a scatter, whose shapes depend on no value
        index = rows.rows[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[-1])
        return out.scatter(2, index, row_out.to(out.dtype))
    bi, ri = rows.valid.nonzero(as_tuple=True)
    out_t = out.transpose(1, 2)  # (B, N, heads, d)
    return out_t.index_put((bi, rows.rows[bi, ri]), row_out.transpose(1, 2)[bi, ri]).transpose(1, 2)


def release_attention(
    attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, rows: SelectingRows,
    high_res: HighResKV | None, alpha: float, map_request: MapRequest | None,
) -> tuple[Tensor, Tensor | None]:
    """``fused_attention`` computed as the authors' training does: every row scores every HR key
    (``high_res`` holds them all, ``HighResSelector(every_token_keys=True)``) through an additive mask,
    and the whole (N, N + M) attention map is materialised; the map for the next layer is read from it.
    The same result at a higher cost; kept as the baseline the benchmarks compare against."""
    b, _, n, _ = q.shape
    all_rows = torch.arange(n, device=q.device).expand(b, n)
    visible = causal_key_mask(all_rows, inputs.past_len, inputs.key_valid, k.shape[2]).unsqueeze(1)
    scores = attn.row_scores(q, k).masked_fill(~visible, float("-inf"))
    plain = scores.softmax(-1)
    out = attn.row_values(plain, v)
    if high_res is not None:
        bi, ri = rows.valid.nonzero(as_tuple=True)
        row_sees = high_res.selection.rows_see(rows.rows.shape[1])  # (B, R, M)
        sees = torch.zeros(b, n, row_sees.shape[-1], dtype=torch.bool, device=q.device).index_put(
            (bi, rows.rows[bi, ri]), row_sees[bi, ri])
        additive = torch.zeros(sees.shape, dtype=q.dtype, device=q.device).masked_fill(~sees, float("-inf"))
        probs = torch.cat((scores, attn.row_scores(q, high_res.k) + additive.unsqueeze(1)), dim=-1).softmax(-1)
        hier = attn.row_values(probs[..., : k.shape[2]], v) + attn.row_values(probs[..., k.shape[2]:], high_res.v)
        out = out + alpha * (hier - out)  # rows that select nothing: hier == plain
    if map_request is None:
        return out, None
    row_plain = gather_rows(plain, rows.rows)
    if not map_request.grad:
        row_plain = row_plain.detach()
    return out, low_res_map(row_plain, map_request.lr_index, map_request.lr_shape)


FLEX_IMPLS = {"fused": fused_attention, "release": release_attention}


def cross_attention(
    flex: FlexAttention, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    kv: HighResKVCache,
) -> Tensor:
    """Self-attention in which every row (``rows``: all of them) also attends to every HR token (the XAttn
    baseline): in one fused call under autograd; without it, as ``fused_attention``'s inference, the
    sequence and the HR keys in a call each, merged through their lse's, so that a decoding step does
    not copy the cache and every HR key into one tensor."""
    attn = flex.attention
    q, k, v = attn.qkv(x, inputs, cache)
    every = kv.keys_values(flex, kv.every_token())
    if not torch.is_grad_enabled():
        plain, lse = _sequence_attention(attn, q, k, v, inputs, with_lse=True)
        if lse is not None:
            return attn.output(_merged_with_high_res(attn, q, plain, lse, every))
    return attn.output(_attend(attn, q, k, v, rows.visible, every))


def mapped_layer(
    layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    map_grad: bool,
) -> tuple[Tensor, Tensor]:
    """A plain decoder layer that also hands back its selecting rows' softmax over the sequence keys,
    (B, heads, R, keys): where a model without HR attention looks, in the layers whose maps would
    select in flex mode (an objective on them, e.g. grounding in lr_only, which needs their gradient),
    or the rows that rate the image tokens for a token reduction (``flexvlm.models.pruning``)."""
    attn = layer.self_attn
    q, k, v = attn.qkv(layer.attention_input(x), inputs, cache)
    out = attn.output(attn.sequence_attention(q, k, v, inputs)[0])
    return layer.after_attention(x, out), row_probs(attn, gather_rows(q, rows.rows), k, rows.visible, map_grad)
