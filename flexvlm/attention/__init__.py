"""Attention backends: registered by name (``attn_backend`` in a config), or any importable class."""

from __future__ import annotations

from flexvlm.attention.base import ATTENTION_BACKENDS, AttentionBackend, LseUnavailable, build_backend
from flexvlm.attention.eager import EagerAttention
from flexvlm.attention.flex import FlexAttentionBackend
from flexvlm.attention.sdpa import SdpaAttention

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "EagerAttention", "FlexAttentionBackend", "LseUnavailable",
           "SdpaAttention", "build_backend"]
