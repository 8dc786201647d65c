"""Hierarchical self-attention (FlexAttention, ECCV 2024), in one place.

A FlexAttention layer is a decoder attention layer whose *selecting* query rows (the rows that
predict answer tokens in training, the current token at inference) also attend to a few high-res
(HR) tokens that never enter the sequence:

    K = [H W_K ; f_sel W_K'],  V = [H W_V ; f_sel W_V']     (W_K', W_V' new, initialised as copies)

How the work is kept to the selecting rows and the selected tokens (docs/method.md, "Cost"):

- Every row goes through fused SDPA over the sequence, as in a plain layer.
- The selecting rows of a sample are scored against the *union* of the HR tokens that any of them
  selected, with a per-row boolean mask, in one more fused SDPA call: no attention map is formed,
  and HR K/V are projected once per token of the union, so memory grows with the union, not with
  rows x selected tokens.
- A decoding step (one row per sample) is computed eagerly: the row's scores over the sequence are
  needed anyway for the next layer's selection, and reusing them beats a second kernel call.
- At inference the projected HR K/V of each layer live in buffers written in place, either lazily
  (only the tokens ever selected: best for short answers) or all at once at the first step
  ("prefill": best for long generations).

The plain (sequence-only) softmax of the selecting rows is handed back to the decoder loop
(``FlexVLM.decode``), which turns it into the next layer's selection through ``HighResState.select``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from flexvlm.models.decoder import (
    AttentionInputs, DecoderAttention, DecoderLayer, KVCache, causal_key_mask, gather_rows,
)
from flexvlm.models.geometry import Shape, VisualLayout
from flexvlm.selection.base import SelectionContext, SelectionStrategy

HIGH_RES_KV_MODES = ("lazy", "prefill")


def selected_first(mask: Tensor, min_width: int = 0) -> tuple[Tensor, Tensor]:
    """(B, L) bool -> indices (B, K) of the True entries in ascending order, padded to the largest
    count K (at least ``min_width``), and valid (B, K)."""
    if mask.shape[0] == 1 and min_width == 0:  # one sample (batch-1 decoding): no padding to sort out
        idx = mask[0].nonzero().view(1, -1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    counts = mask.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, min_width)
    # a stable sort puts the True positions first, in ascending order
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    valid = torch.arange(width, device=mask.device) < counts.unsqueeze(-1)
    return idx, valid


@dataclass
class SelectingRows:
    """The query rows that select (or, for cross-attention, every row), as positions in the current
    chunk: ``rows`` (B, R), padded per sample, ``valid`` (B, R) marks the real ones, ``visible``
    (B, 1, R, keys) the sequence keys each row sees (causal and padding), shared by every layer;
    None when every row sees every key (a decoding step without padding)."""

    rows: Tensor
    valid: Tensor
    visible: Tensor | None
    all_valid: bool  # no padded row

    @classmethod
    def from_mask(cls, row_mask: Tensor, inputs: AttentionInputs) -> "SelectingRows":
        """(B, N) bool over the current chunk -> the selecting rows; R >= 1."""
        n = row_mask.shape[1]
        if n == 1 and inputs.key_valid is None:  # a decoding step: the one row sees every key
            return cls(torch.zeros_like(row_mask, dtype=torch.long), row_mask, None, bool(row_mask.all()))
        rows, valid = selected_first(row_mask, min_width=1)
        visible = causal_key_mask(rows, inputs.past_len, inputs.key_valid, inputs.past_len + n)
        return cls(rows, valid, visible.unsqueeze(1), bool(valid.all()))


@dataclass
class Selection:
    """What one FA layer attends to beyond the sequence: the union of its sample's selected HR
    tokens, ``tokens`` (B, K) padded with ``valid`` (B, K), and ``row_mask`` (B, R, K): which of
    them each selecting row sees (None: every row sees every token, no padding). ``tokens`` None:
    every HR token of the image, K = M (cross-attention, or a union that covers most of it).
    ``key_bias`` (B, R, K): what a soft selection adds to each row's scores of these keys (None: binary)."""

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


class HighResState:
    """The HR side of one forward pass or one whole generation: the HR features and their RoPE, the
    selection strategy, the per-layer buffers of projected HR K/V (inference), and a record of the
    last step's selections."""

    def __init__(
        self,
        features: Tensor,
        cos: Tensor,
        sin: Tensor,
        lr_index: Tensor,
        layout: VisualLayout,
        strategy: SelectionStrategy | None,
        dense: bool = False,
        alpha: float = 1.0,
        kv_mode: str = "lazy",
        map_grad: bool = False,
    ) -> None:
        """features (B, M, D): projected HR tokens on the layout's canvas (M = H * W); cos / sin (B, M, d):
        their RoPE; lr_index (B, h*w): key positions of the low-res image tokens; ``layout``: the
        batch's geometry (``flexvlm.models.geometry``); ``dense``:
        every row sees every HR token (cross-attention baseline) and nothing is selected;
        ``kv_mode``: how HR K/V are projected at inference, ``lazy`` or ``prefill``; ``map_grad``:
        the selecting maps keep their gradient (for a training objective on where the model looks;
        otherwise they cost no memory in the backward pass)."""
        if kv_mode not in HIGH_RES_KV_MODES:
            raise ValueError(f"unknown high-res K/V mode {kv_mode!r}; valid: {list(HIGH_RES_KV_MODES)}")
        self.features, self.cos, self.sin = features, cos, sin
        self.lr_index, self.layout, self.hr_valid = lr_index, layout, layout.hr_valid
        self.strategy, self.dense, self.alpha, self.kv_mode = strategy, dense, alpha, kv_mode
        self.map_grad = map_grad
        self._base_context = SelectionContext(layout, layer=-1)
        # (B,) HR tokens a row can select: those of the image, or every one for a strategy that keeps
        # padding (whole blocks), so that a fraction never exceeds 1
        selectable = (self.hr_valid if strategy is None
                      else strategy.clip(torch.ones_like(self.hr_valid)[:, None], self._base_context))
        self.available = selectable.flatten(1).sum(-1).clamp(min=1)
        self._contexts: dict[int, SelectionContext] = {}  # FA layer -> its context, sharing the memo
        self._kv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> K, V buffers, projected (B, M)
        self._last: dict[int, tuple[Tensor, ...]] = {}  # layer -> tokens, valid, their K, V last gathered
        self._every: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> K, V of every token (cross-attention)
        self.start_step(None)

    def start_step(self, rows: SelectingRows | None) -> None:
        """Forget the last step's record; ``rows`` select in the step that follows."""
        self.rows = rows
        self.masks: dict[int, Tensor] = {}  # FA layer -> (B, R, H, W) selection masks
        # FA layer -> (B, R, h, w) the head-summed low-res attention that selected for it (with its
        # gradient when ``map_grad``)
        self.maps: dict[int, Tensor] = {}
        self.row_counts: dict[int, Tensor] = {}  # FA layer -> (B, R) HR tokens selected

    # -- selection ------------------------------------------------------------------------------
    def select(self, layer_idx: int, probs: Tensor) -> Selection:
        """The selecting rows' plain attention (B, heads, R, keys) of layer ``layer_idx`` - 1 ->
        the selection of layer ``layer_idx``."""
        b, _, r, _ = probs.shape
        attn_map = low_res_map(probs, self.lr_index, self.layout.lr_shape)
        self.maps[layer_idx] = attn_map
        mask = self.strategy(attn_map.detach(), self._context(layer_idx))
        bias = self.strategy.key_bias(attn_map.detach(), self._context(layer_idx))
        if not self.rows.all_valid:
            mask = mask & self.rows.valid[:, :, None, None]
        self.masks[layer_idx] = mask
        flat = mask.flatten(2)
        self.row_counts[layer_idx] = flat.sum(-1)
        if r == 1:  # one row per sample (inference): the union is the row's own selection
            tokens, valid = selected_first(flat[:, 0])
            return Selection(tokens, valid, None if b == 1 else valid[:, None], _on_tokens(bias, tokens))
        tokens, valid = selected_first(flat.any(1))
        if 4 * tokens.shape[1] >= 3 * flat.shape[-1]:
            # the union is most of the image: projecting every token costs little more than the
            # union, and saves a copy of most of the features for the backward pass
            return Selection(None, self.hr_valid.flatten(1), flat, None if bias is None else bias.flatten(2))
        row_mask = flat.gather(-1, tokens[:, None].expand(-1, r, -1)) & valid[:, None]
        return Selection(tokens, valid, row_mask, _on_tokens(bias, tokens))

    def all_tokens(self) -> Selection:
        """Every HR token of the image, seen by every row (the cross-attention baseline)."""
        valid = self.hr_valid.flatten(1)
        return Selection(None, valid, valid[:, None])

    def _context(self, layer_idx: int) -> SelectionContext:
        if layer_idx not in self._contexts:
            self._contexts[layer_idx] = replace(self._base_context, layer=layer_idx)
        return self._contexts[layer_idx]

    @property
    def selected_fraction(self) -> dict[int, Tensor]:
        """FA layer -> mean fraction of the image's HR tokens over the real selecting rows."""
        real = self.rows.valid
        if not real.any():
            return {}
        return {layer: (count / self.available[:, None])[real].mean() for layer, count in self.row_counts.items()}

    def row_fraction(self) -> Tensor | None:
        """(B, R) fraction of HR tokens each selecting row used, mean over FA layers."""
        if not self.row_counts:
            return None
        return torch.stack(list(self.row_counts.values())).float().mean(0) / self.available[:, None]

    def sample_fraction(self) -> Tensor | None:
        """(B,) mean fraction of HR tokens each sample's selecting rows used, over FA layers."""
        per_row = self.row_fraction()
        if per_row is None:
            return None
        real = self.rows.valid
        return (per_row * real).sum(-1) / real.sum(-1).clamp(min=1)

    # -- projected HR keys and values -------------------------------------------------------------
    def high_res_kv(self, attn: "FlexAttention", selection: Selection) -> HighResKV:
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
        if tokens is None:  # every token (cross-attention), kept in the layout attention reads
            if layer not in self._every:
                self._every[layer] = attn.project_high_res(self.features, self.cos, self.sin)
            return HighResKV(*self._every[layer], selection)
        last = self._last.get(layer)
        # a selection that stays put is gathered once (padded entries too: a token that turns valid
        # must have been projected, hence valid is compared as well)
        if last is None or not (torch.equal(last[0], tokens) and torch.equal(last[1], selection.valid)):
            k_buf, v_buf = self._buffers(attn, tokens, selection.valid)
            k, v = (_gather_tokens(buf, tokens).transpose(1, 2).contiguous() for buf in (k_buf, v_buf))
            last = (tokens, selection.valid, k, v)
            self._last[layer] = last
        return HighResKV(last[2], last[3], selection)

    @torch.no_grad()
    def _buffers(self, attn: "FlexAttention", tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M, kv_heads, d) K and V buffers of the layer with at least the valid ``tokens`` (B, K)
        projected; each (layer, token) pair is projected at most once per state."""
        layer = attn.attention.layer_idx
        if layer not in self._kv:
            b, m, _ = self.features.shape
            if self.kv_mode == "prefill":
                k, v = (t.transpose(1, 2).contiguous() for t in attn.project_high_res(self.features, self.cos, self.sin))
                self._kv[layer] = (k, v, self.features.new_ones(b, m, dtype=torch.bool))
                return k, v
            shape = (b, m, attn.attention.num_kv_heads, attn.attention.head_dim)
            self._kv[layer] = (self.features.new_zeros(shape), self.features.new_zeros(shape),
                               self.features.new_zeros(b, m, dtype=torch.bool))
        k_buf, v_buf, done = self._kv[layer]
        todo = valid & ~done.gather(1, tokens)
        if todo.any():
            bi, ki = todo.nonzero(as_tuple=True)
            mi = tokens[bi, ki]
            k_new, v_new = attn.project_high_res(self.features[bi, mi], self.cos[bi, mi], self.sin[bi, mi])
            k_buf[bi, mi] = k_new  # written in place: no copy of the whole buffer
            v_buf[bi, mi] = v_new
            done[bi, mi] = True
        return k_buf, v_buf


def low_res_map(probs: Tensor, lr_index: Tensor, lr_shape: Shape) -> Tensor:
    """Rows' softmax over the sequence keys (B, heads, R, keys) -> their head-summed attention on the
    h x w low-res image tokens at ``lr_index`` (B, h*w): (B, R, h, w), the map that selects."""
    b, _, r, _ = probs.shape
    return probs.sum(1).gather(-1, lr_index[:, None].expand(b, r, -1)).view(b, r, *lr_shape)


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
    projections W_K', W_V'. Called as a module it is that attention; ``flex_attention`` /
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
    selection: Selection | None, state: HighResState, need_map: bool, impl: str = "fused",
) -> tuple[Tensor, Tensor | None]:
    """A decoder layer in flex mode, its attention computed by ``FLEX_IMPLS[impl]``.
    -> (hidden states, the rows' map or None)."""
    attention = FLEX_IMPLS[impl]
    out, probs = attention(layer.self_attn, layer.attention_input(x), inputs, cache, rows, selection, state, need_map)
    return layer.after_attention(x, out), probs


def cross_attention_layer(
    layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    state: HighResState,
) -> Tensor:
    """A decoder layer of the cross-attention baseline (see ``cross_attention``)."""
    return layer.after_attention(x, cross_attention(layer.self_attn, layer.attention_input(x), inputs, cache, rows,
                                                    state))


def _family_attention(layer_attn: DecoderAttention | FlexAttention) -> DecoderAttention:
    """The family's attention of a FlexAttention layer, or of the plain layer whose map seeds the
    first selection."""
    return layer_attn.attention if isinstance(layer_attn, FlexAttention) else layer_attn


def flex_attention(
    layer_attn: DecoderAttention | FlexAttention, x: Tensor, inputs: AttentionInputs, cache: KVCache | None,
    rows: SelectingRows, selection: Selection | None, state: HighResState, need_map: bool,
) -> tuple[Tensor, Tensor | None]:
    """Self-attention in which the selecting ``rows`` also attend to their ``selection`` of HR tokens
    (None: plain self-attention, as in the layer whose map seeds the first selection).
    -> (output (B, N, D), the rows' plain softmax over the sequence keys (B, heads, R, keys) when
    ``need_map``, else None)."""
    attn = _family_attention(layer_attn)
    q, k, v = attn.qkv(x, inputs, cache)
    visible = rows.visible
    high_res = state.high_res_kv(layer_attn, selection) if selection is not None else None
    if q.shape[2] == 1:
        out, probs = _single_row(attn, q, k, v, visible, high_res, state.alpha)
        return attn.output(out), probs if need_map else None
    out = attn.sequence_attention(q, k, v, inputs)
    q_rows = gather_rows(q, rows.rows)
    if high_res is not None:
        out = _scatter_rows(out, _attend(attn, q_rows, k, v, visible, high_res), rows, state.alpha)
    probs = row_probs(attn, q_rows, k, visible, state.map_grad) if need_map else None
    return attn.output(out), probs


def mapped_layer(
    layer: DecoderLayer, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    map_grad: bool,
) -> tuple[Tensor, Tensor]:
    """A plain decoder layer that also hands back its selecting rows' softmax over the sequence keys,
    (B, heads, R, keys): where a model without HR attention looks, in the layers whose maps would
    select in flex mode (an objective on them, e.g. grounding in lr_only), or the rows that rate the
    image tokens for a token reduction (``flexvlm.models.pruning``)."""
    attn = layer.self_attn
    q, k, v = attn.qkv(layer.attention_input(x), inputs, cache)
    out = attn.output(attn.sequence_attention(q, k, v, inputs))
    return layer.after_attention(x, out), row_probs(attn, gather_rows(q, rows.rows), k, rows.visible, map_grad)


def row_probs(attn: DecoderAttention, q_rows: Tensor, k: Tensor, visible: Tensor, map_grad: bool) -> Tensor:
    """The rows' plain softmax over the keys they see; with its gradient only when ``map_grad``."""
    with torch.set_grad_enabled(map_grad and torch.is_grad_enabled()):
        return attn.row_scores(q_rows, k).masked_fill(~visible, float("-inf")).softmax(-1)


def release_flex_attention(
    layer_attn: DecoderAttention | FlexAttention, x: Tensor, inputs: AttentionInputs, cache: KVCache | None,
    rows: SelectingRows, selection: Selection | None, state: HighResState, need_map: bool,
) -> tuple[Tensor, Tensor | None]:
    """``flex_attention`` computed as the authors' training does: every row scores every HR key
    through an additive mask and the whole (N, N + M) attention map is materialised. The same
    result at a higher cost; kept as the baseline the benchmarks compare against."""
    attn = _family_attention(layer_attn)
    q, k, v = attn.qkv(x, inputs, cache)
    b, _, n, _ = q.shape
    all_rows = torch.arange(n, device=q.device).expand(b, n)
    visible = causal_key_mask(all_rows, inputs.past_len, inputs.key_valid, k.shape[2]).unsqueeze(1)
    scores = attn.row_scores(q, k).masked_fill(~visible, float("-inf"))
    plain = scores.softmax(-1)
    out = attn.row_values(plain, v)
    if selection is not None:
        every = state.high_res_kv(layer_attn, state.all_tokens())
        m = every.k.shape[2]
        bi, ri = rows.valid.nonzero(as_tuple=True)
        row_sees = selection.rows_see(rows.rows.shape[1])  # (B, R, tokens of the selection)
        if selection.tokens is not None:  # onto the whole high-res grid
            on_grid = torch.zeros(*row_sees.shape[:2], m, dtype=torch.bool, device=q.device)
            row_sees = on_grid.scatter_(-1, selection.tokens[:, None].expand_as(row_sees), row_sees)
        sees = torch.zeros(b, n, m, dtype=torch.bool, device=q.device).index_put((bi, rows.rows[bi, ri]), row_sees[bi, ri])
        additive = torch.zeros(sees.shape, dtype=q.dtype, device=q.device).masked_fill(~sees, float("-inf"))
        probs = torch.cat((scores, attn.row_scores(q, every.k) + additive.unsqueeze(1)), dim=-1).softmax(-1)
        hier = attn.row_values(probs[..., : k.shape[2]], v) + attn.row_values(probs[..., k.shape[2]:], every.v)
        out = out + state.alpha * (hier - out)  # rows that select nothing: hier == plain
    probs = gather_rows(plain, rows.rows) if need_map else None
    return attn.output(out), probs if probs is None or state.map_grad else probs.detach()


def cross_attention(
    flex: FlexAttention, x: Tensor, inputs: AttentionInputs, cache: KVCache | None, rows: SelectingRows,
    state: HighResState,
) -> Tensor:
    """Self-attention in which every row (``rows``: all of them) also attends to every HR token
    (the XAttn baseline)."""
    attn = flex.attention
    q, k, v = attn.qkv(x, inputs, cache)
    n = q.shape[2]
    high_res = state.high_res_kv(flex, state.all_tokens())
    if n == 1:
        return attn.output(_single_row(attn, q, k, v, rows.visible, high_res, alpha=1.0)[0])
    return attn.output(_attend(attn, q, k, v, rows.visible, high_res))


FLEX_IMPLS = {"fused": flex_attention, "release": release_flex_attention}


def _attend(
    attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, high_res: HighResKV
) -> Tensor:
    """Query rows (B, heads, R, d) over [their visible sequence keys ; the HR keys they see], fused."""
    mask = torch.cat((visible, high_res.selection.rows_see(q.shape[2]).unsqueeze(1)), dim=-1)
    bias = high_res.selection.key_bias
    if bias is not None:  # a soft selection: an additive mask carries the keys' weights
        scores_added = torch.cat((torch.zeros_like(visible, dtype=q.dtype), bias.unsqueeze(1).to(q.dtype)), dim=-1)
        mask = scores_added.masked_fill(~mask, float("-inf"))
    return attn.attend(q, torch.cat((k, high_res.k), dim=2), torch.cat((v, high_res.v), dim=2), mask)


def _single_row(
    attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, high_res: HighResKV | None,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """One query row per sample (a decoding step), eagerly: its scores over the sequence give both
    the plain map and, with the HR scores, the hierarchical output. -> (output, plain probs)."""
    scores = attn.row_scores(q, k)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    plain = scores.softmax(-1)
    if high_res is None:
        return attn.row_values(plain, v), plain
    hr_scores = attn.row_scores(q, high_res.k)
    if high_res.selection.key_bias is not None:
        hr_scores = hr_scores + high_res.selection.key_bias.unsqueeze(1)
    if high_res.selection.row_mask is not None:
        hr_scores = hr_scores.masked_fill(~high_res.selection.row_mask.unsqueeze(1), float("-inf"))
    probs = torch.cat((scores, hr_scores), dim=-1).softmax(-1)
    keys = k.shape[2]
    hier = attn.row_values(probs[..., :keys], v) + attn.row_values(probs[..., keys:], high_res.v)
    if alpha == 1.0:
        return hier, plain
    plain_out = attn.row_values(plain, v)
    return plain_out + alpha * (hier - plain_out), plain


def _scatter_rows(out: Tensor, hier: Tensor, rows: SelectingRows, alpha: float) -> Tensor:
    """Write the selecting rows' hierarchical output (B, heads, R, d) into ``out`` (B, heads, N, d),
    blended with the plain output by ``alpha``; padded rows keep the plain output."""
    bi, ri = rows.valid.nonzero(as_tuple=True)
    pos = rows.rows[bi, ri]
    out_t = out.transpose(1, 2)  # (B, N, heads, d)
    plain = out_t[bi, pos]
    blended = plain + alpha * (hier.transpose(1, 2)[bi, ri] - plain)
    return out_t.index_put((bi, pos), blended).transpose(1, 2)
