"""Hierarchical self-attention (FlexAttention, ECCV 2024), in one place.

A FlexAttention layer is a decoder attention layer whose *selecting* query rows (the rows that
predict answer tokens in training, the current token at inference) also attend to a few high-res
(HR) tokens that never enter the sequence:

    K = [H W_K ; f_sel W_K'],  V = [H W_V ; f_sel W_V']     (W_K', W_V' new, initialised as copies)

Every row first goes through fused SDPA over the sequence. Only the selecting rows are then
recomputed eagerly over [their causal sequence keys ; their own selected HR keys]: the extra work is
O(rows x (N + M_sel) x d), and no N x N map is ever formed. The plain (sequence-only) softmax of
those rows is handed on, and the selection strategy turns it into the next layer's selection.

``HighResState`` carries what the layers share for one forward pass (or one whole generation):
the HR features and their RoPE, the current selection, and a per-layer cache of HR K/V projections
so that a (layer, HR token) pair is projected at most once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.models.llm import (
    Attention, AttentionInputs, KVCache, LlamaConfig, RowProbe, apply_rope, causal_key_mask, gather_rows,
)
from flexvlm.selection.base import SelectionContext, SelectionStrategy


def interpolate_rope(cos: Tensor, sin: Tensor, lr_grid: int, hr_grid: int) -> tuple[Tensor, Tensor]:
    """RoPE for HR keys, as the release does: take cos / sin at the g x g low-res image positions and
    interpolate them bicubically onto the G x G high-res grid. (B, g*g, d) -> (B, G*G, d)."""

    def resize(table: Tensor) -> Tensor:
        b, _, d = table.shape
        grid = table.float().transpose(1, 2).reshape(b, d, lr_grid, lr_grid)
        grid = F.interpolate(grid, size=(hr_grid, hr_grid), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(table.dtype)

    return resize(cos), resize(sin)


def selected_first(mask: Tensor, min_width: int = 0) -> tuple[Tensor, Tensor]:
    """(..., L) bool -> indices (..., K) of the True entries in ascending order, padded to the
    largest count K (at least ``min_width``), and valid (..., K)."""
    counts = mask.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, min_width)
    # a stable sort puts the True positions first, in ascending order
    idx = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    valid = torch.arange(width, device=mask.device) < counts.unsqueeze(-1)
    return idx, valid


def pack_rows(row_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> the selecting rows (B, R), padded, and valid (B, R); R >= 1."""
    return selected_first(row_mask, min_width=1)


class HighResState:
    """What the FlexAttention layers of one model share during a forward pass or a generation."""

    def __init__(
        self,
        features: Tensor,
        cos: Tensor,
        sin: Tensor,
        lr_index: Tensor,
        lr_valid: Tensor,
        hr_valid: Tensor,
        strategy: SelectionStrategy | None,
        dense: bool = False,
        alpha: float = 1.0,
    ) -> None:
        """features (B, M, D): projected HR tokens; cos / sin (B, M, d): their RoPE; lr_index (B, g*g):
        key positions of the low-res image tokens; lr_valid / hr_valid: the margin masks; ``dense``:
        every row sees every HR token (cross-attention baseline) and nothing is selected."""
        self.features, self.cos, self.sin = features, cos, sin
        self.lr_index, self.lr_valid, self.hr_valid = lr_index, lr_valid, hr_valid
        self.lr_grid, self.hr_grid = lr_valid.shape[-1], hr_valid.shape[-1]
        self.strategy, self.dense, self.alpha = strategy, dense, alpha
        self.rows_valid: Tensor | None = None
        # layer -> (B, R, K) indices, (B, R, K) valid; kept per layer so that a layer recomputed by
        # gradient checkpointing reads the selection it had in the forward pass
        self.selections: dict[int, tuple[Tensor, Tensor]] = {}
        self.masks: dict[int, Tensor] = {}  # layer -> (B, R, G, G) selection masks of the last step
        # layer -> (B, R, g, g) the head-summed low-res attention that selected for it, with its
        # gradient (what a training objective on where the model looks needs)
        self.maps: dict[int, Tensor] = {}
        self.row_fractions: dict[int, Tensor] = {}  # layer -> (B, R) fraction of the image's HR tokens
        self._kv: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def probe(self, rows: Tensor, valid: Tensor, layers: frozenset[int]) -> RowProbe:
        """The probe that feeds this state: rows (B, R) select, their maps at ``layers`` select for
        the layer after. Called once per forward step (prefill, then every decode step)."""
        self.rows_valid = valid
        self.selections, self.maps = {}, {}
        return RowProbe(rows=rows, valid=valid, layers=layers, callback=self.observe)

    def observe(self, layer_idx: int, probs: Tensor) -> None:
        """Turn layer ``layer_idx``'s row attention (B, heads, R, keys) into the selection of layer + 1."""
        b, _, r, keys = probs.shape
        index = self.lr_index.unsqueeze(1).expand(b, r, -1)
        attn_map = probs.sum(1).gather(-1, index).view(b, r, self.lr_grid, self.lr_grid)
        self.maps[layer_idx + 1] = attn_map
        ctx = SelectionContext(self.lr_grid, self.hr_grid, self.lr_valid, self.hr_valid, layer_idx + 1)
        self.set_selection(self.strategy(attn_map.detach(), ctx), layer_idx + 1)

    def set_selection(self, mask: Tensor, layer_idx: int) -> None:
        """(B, R, G, G) bool -> padded index lists; rows that are only padding select nothing."""
        mask = mask & self.rows_valid[:, :, None, None]
        idx, valid = selected_first(mask.flatten(2))
        self.selections[layer_idx] = (idx, valid)
        self.masks[layer_idx] = mask
        available = self.hr_valid.flatten(1).sum(-1).clamp(min=1).unsqueeze(-1)
        self.row_fractions[layer_idx] = valid.sum(-1) / available

    @property
    def selected_fraction(self) -> dict[int, Tensor]:
        """FA layer -> mean fraction of the image's HR tokens over the real selecting rows."""
        return {layer: f[self.rows_valid].mean() for layer, f in self.row_fractions.items() if self.rows_valid.any()}

    def sample_fraction(self) -> Tensor:
        """(B,) mean fraction of HR tokens each sample's selecting rows used, over FA layers."""
        per_layer = torch.stack([(f * self.rows_valid).sum(-1) for f in self.row_fractions.values()])
        return per_layer.mean(0) / self.rows_valid.sum(-1).clamp(min=1)

    def projected_kv(self, attn: "FlexAttention", needed: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M, kv_heads, d) HR keys (with RoPE) and values of ``attn``'s layer; only the ``needed``
        (B, M) tokens not projected before in this state are projected now, the rest is reused.
        Reuse is for inference (a generation's steps): under autograd every call projects afresh,
        so that no cached tensor crosses a gradient-checkpointing boundary."""
        b, m, _ = self.features.shape
        if torch.is_grad_enabled() or attn.layer_idx not in self._kv:
            shape = (b, m, attn.num_kv_heads, attn.head_dim)
            empty = self.features.new_zeros(shape)
            self._kv[attn.layer_idx] = (empty, empty, needed.new_zeros(b, m))
        k_buf, v_buf, done = self._kv[attn.layer_idx]
        todo = needed & ~done
        if todo.any():
            bi, mi = todo.nonzero(as_tuple=True)
            k_new, v_new = attn.project_high_res(self.features[bi, mi], self.cos[bi, mi], self.sin[bi, mi])
            k_buf = k_buf.index_put((bi, mi), k_new)
            v_buf = v_buf.index_put((bi, mi), v_new)
            self._kv[attn.layer_idx] = (k_buf, v_buf, done | todo)
        return k_buf, v_buf


class FlexAttention(Attention):
    """Causal self-attention plus, for the selecting rows, attention to their selected HR tokens."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        kv_dim = config.kv_heads * config.head_dim
        self.k_hr_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.v_hr_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.init_high_res_projections()

    @classmethod
    def from_attention(cls, attn: Attention, config: LlamaConfig) -> "FlexAttention":
        """Upgrade a plain attention layer in place of its weights; W_K', W_V' start as W_K, W_V."""
        flex = cls(config, attn.layer_idx).to(attn.q_proj.weight)
        flex.load_state_dict(attn.state_dict(), strict=False)
        flex.init_high_res_projections()
        return flex

    @torch.no_grad()
    def init_high_res_projections(self) -> None:
        """W_K' <- W_K, W_V' <- W_V (the paper's initialisation; call again after loading weights)."""
        self.k_hr_proj.load_state_dict(self.k_proj.state_dict())
        self.v_hr_proj.load_state_dict(self.v_proj.state_dict())

    def project_high_res(self, features: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """(n, D) HR features -> (n, kv_heads, d) keys with RoPE, values without (as the release)."""
        shape = (features.shape[0], self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_hr_proj(features).view(shape), cos, sin)
        return k, self.v_hr_proj(features).view(shape)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        state: HighResState | None = inputs.high_res
        if state is None:
            return super().forward(x, inputs, cache)
        q, k, v = self.qkv(x, inputs, cache)
        if state.dense:
            out = self._dense(q, k, v, inputs, state)
        else:
            out = self.sequence_attention(q, k, v, inputs)
            probe = inputs.probe
            if probe is not None:
                out = self._selecting_rows(q, k, v, out, inputs, probe, state)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _selecting_rows(
        self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, inputs: AttentionInputs, probe: RowProbe,
        state: HighResState,
    ) -> Tensor:
        scores, _ = self.probe_scores(q, k, inputs)  # (B, H, R, keys), causal + padding masked
        if self.layer_idx in state.selections:
            out = self._hierarchical(q, v, scores, out, probe, state)
        if self.layer_idx in probe.layers:
            probe.callback(self.layer_idx, scores.softmax(-1))
        return out

    def _hierarchical(
        self, q: Tensor, v: Tensor, scores: Tensor, out: Tensor, probe: RowProbe, state: HighResState
    ) -> Tensor:
        idx, valid = state.selections[self.layer_idx]
        b, h, r, keys = scores.shape
        k_buf, v_buf = state.projected_kv(self, _union(idx, valid, state.features.shape[1]))
        batch = torch.arange(b, device=idx.device)[:, None, None]
        k_sel, v_sel = k_buf[batch, idx], v_buf[batch, idx]  # (B, R, K, kv_heads, d)
        groups = h // self.num_kv_heads
        q_rows = gather_rows(q, probe.rows).view(b, self.num_kv_heads, groups, r, self.head_dim)
        hr_scores = torch.einsum("bgqrd,brkgd->bgqrk", q_rows, k_sel) / math.sqrt(self.head_dim)
        hr_scores = hr_scores.masked_fill(~valid[:, None, None], float("-inf")).reshape(b, h, r, -1)
        probs = torch.cat((scores, hr_scores), dim=-1).softmax(-1)
        hr_probs = probs[..., keys:].view(b, self.num_kv_heads, groups, r, -1)
        hier = self.row_values(probs[..., :keys], v)
        hier = hier + torch.einsum("bgqrk,brkgd->bgqrd", hr_probs, v_sel).reshape(b, h, r, self.head_dim)
        # scatter the real rows back; padded rows keep SDPA's output
        bi, ri = probe.valid.nonzero(as_tuple=True)
        pos = probe.rows[bi, ri]
        out_t = out.transpose(1, 2)  # (B, N, H, d)
        plain = out_t[bi, pos]
        blended = plain + state.alpha * (hier.permute(0, 2, 1, 3)[bi, ri] - plain)
        return out_t.index_put((bi, pos), blended).transpose(1, 2)

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, state: HighResState) -> Tensor:
        """Cross-attention baseline: every row also attends to every HR token of its image."""
        hr_valid = state.hr_valid.flatten(1)
        k_buf, v_buf = state.projected_kv(self, hr_valid)
        b, n = q.shape[0], q.shape[2]
        rows = torch.arange(n, device=q.device).expand(b, n)
        seq_mask = causal_key_mask(rows, inputs.past_len, inputs.key_valid, k.shape[2])
        mask = torch.cat((seq_mask, hr_valid.unsqueeze(1).expand(-1, n, -1)), dim=-1).unsqueeze(1)
        keys = torch.cat((k, k_buf.transpose(1, 2)), dim=2)
        values = torch.cat((v, v_buf.transpose(1, 2)), dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              enable_gqa=self.num_heads != self.num_kv_heads)


def _union(idx: Tensor, valid: Tensor, num_tokens: int) -> Tensor:
    """(B, M) bool: HR tokens selected by any row of the sample."""
    union = torch.zeros(idx.shape[0], num_tokens, dtype=torch.bool, device=idx.device)
    bi = torch.arange(idx.shape[0], device=idx.device)[:, None, None].expand_as(idx)
    return union.index_put((bi[valid], idx[valid]), torch.ones((), dtype=torch.bool, device=idx.device))
