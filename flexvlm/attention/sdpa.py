"""torch's scaled_dot_product_attention: the default. Its public call returns no log-sum-exp; where one is
asked, the fused kernels that compute it anyway are called by their aten names (the CPU flash kernel,
CUDA's memory-efficient one), which take an additive mask and full kv heads, and which autocast does not
reach (the inputs are cast as it casts SDPA's); their lse is returned without a gradient (the kernels
give it none), so maps that need one are the eager backend's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexvlm.attention.base import ATTENTION_BACKENDS, AttentionBackend, LseUnavailable


@ATTENTION_BACKENDS.register("sdpa")
class SdpaAttention(AttentionBackend):
    name = "sdpa"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                 return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        if not return_lse:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return out, None
        q, k, v = _as_autocast(q, k, v)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # a copy of every key and value: only where the heads are grouped
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        bias = _additive(mask, q)
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, is_causal=is_causal, attn_mask=bias)
            return out, lse.detach()
        if q.device.type == "cuda":
            if bias is not None:  # the kernel reads the bias in blocks of its full (R, keys) shape
                bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, compute_log_sumexp=True, is_causal=is_causal)
            return out, lse[..., : q.shape[2]].detach()  # the kernel pads its rows to its block size
        raise LseUnavailable(f"sdpa gives no log-sum-exp on {q.device.type}: use attn_backend eager there")


def _as_autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on (it would cast SDPA's inputs so; under it a
    layer's queries and keys, through RoPE, and values may differ in dtype)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _additive(mask: Tensor | None, q: Tensor) -> Tensor | None:
    """A bool mask as the additive one the lse kernels take (0 seen, -inf unseen), in the queries' dtype."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
