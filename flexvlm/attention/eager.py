"""The reference backend: scores, mask and softmax written out (every other backend is tested against it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexvlm.attention.base import ATTENTION_BACKENDS, AttentionBackend


@ATTENTION_BACKENDS.register("eager")
class EagerAttention(AttentionBackend):
    name = "eager"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                 return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if is_causal:  # row i sees keys 0 .. i, as SDPA's is_causal
            rows, keys = scores.shape[-2:]
            causal = torch.ones(rows, keys, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        lse = scores.logsumexp(-1)
        out = torch.exp(scores - lse[..., None]) @ v
        return out, lse if return_lse else None
