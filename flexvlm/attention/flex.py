"""torch's flex_attention (torch.nn.attention.flex_attention), compiled: the mask becomes a BlockMask, so
that blocks of keys no row of a block sees are skipped, and an additive mask a score_mod. On CPU (this
torch) it runs the forward pass only and returns no log-sum-exp; it refuses both with the reason.

Rows and keys are padded to whole blocks (the padding unseen, its output dropped) and the kernel compiled
for static shapes: a generation's growing cache then reuses one kernel for a block's worth of steps, and
no dynamic-shape kernel is built (this torch's CPU one fails to compile once shapes turn dynamic)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flexvlm.attention.base import ATTENTION_BACKENDS, AttentionBackend, LseUnavailable

BLOCK = 128  # flex_attention's default block size


@functools.cache
def _kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """flex_attention compiled for static shapes (a kernel built at the first call of a shape), and
    create_block_mask; imported at the first call, since torch's compiler takes seconds to import, which
    every process that never uses this backend would pay."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), create_block_mask


@ATTENTION_BACKENDS.register("flex")
class FlexAttentionBackend(AttentionBackend):
    name = "flex"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                 return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        if q.device.type == "cpu":
            if return_lse:
                raise LseUnavailable("flex_attention returns no log-sum-exp on CPU in this torch: use attn_backend "
                                     "sdpa or eager there")
            if torch.is_grad_enabled() and q.requires_grad:
                raise NotImplementedError("flex_attention's backward pass does not run on CPU in this torch: train "
                                          "with attn_backend sdpa there (flex runs CPU inference, and trains on GPU)")
        rows, keys = q.shape[2], k.shape[2]
        q, k, v = _to_blocks(q, 2), _to_blocks(k, 2), _to_blocks(v, 2)
        if mask is not None:
            unseen = False if mask.dtype == torch.bool else float("-inf")
            mask = _to_blocks(_to_blocks(mask, 2), 3, value=unseen)
        seen = mask if mask is None or mask.dtype == torch.bool else mask > float("-inf")
        block_mask = _block_mask(seen, is_causal, keys, q.shape[0], q.shape[2], k.shape[2], q.device)
        score_mod = None
        if mask is not None and mask.dtype != torch.bool:
            bias = mask.expand(-1, q.shape[1], -1, -1)

            def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return score + bias[b, h, q_idx, kv_idx]

        flex_attention = _kernels()[0]
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
                             return_lse=return_lse)
        if return_lse:
            out, lse = out
            return out[:, :, :rows], lse[:, :, :rows]
        return out[:, :, :rows], None


def _to_blocks(x: Tensor, dim: int, value: float | bool = 0) -> Tensor:
    """``x`` padded with ``value`` along ``dim`` to a whole number of blocks."""
    pad = -x.shape[dim] % BLOCK
    if not pad:
        return x
    if x.dtype == torch.bool:
        return torch.cat((x, x.new_full((*x.shape[:dim], pad, *x.shape[dim + 1:]), bool(value))), dim)
    return F.pad(x, (0, 0) * (x.ndim - 1 - dim) + (0, pad), value=value)


def _block_mask(seen: Tensor | None, is_causal: bool, keys: int, batch: int, rows: int, padded_keys: int,
                device: torch.device):
    """The BlockMask of which of the ``keys`` real keys each row sees (``seen`` (B, 1 or heads, R, keys),
    and / or causal)."""
    if seen is None and not is_causal and keys == padded_keys:
        return None
    per_head = seen is not None and seen.shape[1] > 1

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = kv_idx < keys  # the padding keys: unseen
        if is_causal:
            allowed = allowed & (q_idx >= kv_idx)
        if seen is not None:
            allowed = allowed & seen[b, h if per_head else 0, q_idx, kv_idx]
        return allowed

    heads = seen.shape[1] if per_head else None
    return _kernels()[1](mask_mod, batch, heads, rows, padded_keys, device=device)
