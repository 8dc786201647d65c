"""The LLaMA-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional q/k/v bias
(Qwen2), KV cache.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``...),
so a Llama / Vicuna / Qwen2 state dict loads without a rename table. The decoder knows nothing of
FlexAttention: ``flexvlm.models.vlm`` runs its own loop over these layers (``attention_inputs``,
``DecoderLayer.feed_forward``, ``checkpointed``) and ``flexvlm.models.flex_attention`` uses the
attention's pieces (``qkv``, ``row_scores``, ``row_values``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: multi-head attention (= num_heads)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # q/k/v bias, as in Qwen2
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset, optionally shrunk or changed (``from_name("vicuna-7b", num_layers=2)``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LLM preset {name!r}; valid presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, LlamaConfig] = {
    # the built-in synthetic task's decoder (docs/synthetic-task.md: width 64, 4 heads, 3 layers)
    "tiny": LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                        max_position_embeddings=512),
    "small": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                         max_position_embeddings=2048),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, max_position_embeddings=2048),
    "qwen2-0.5b": LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                              num_heads=14, num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                              attention_bias=True, max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-2-7b": LlamaConfig(),
    "vicuna-7b-v1.5": LlamaConfig(),
    "llama-2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
    "vicuna-13b-v1.5": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 as LLaMA does, then cast back
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embedding (the 'rotate half' layout of LLaMA)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, N, d); cos, sin: (B, N, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Per-layer keys and values of the sequence (never high-res tokens). Written in place into
    buffers that grow by half when full, so that a decoding step copies its new key, not the whole cache."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (B, kv_heads, capacity, d) K, V
        self._lengths: dict[int, int] = {}

    def __len__(self) -> int:
        return next(iter(self._lengths.values()), 0)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, kv_heads, n, d) keys and values; -> all of the layer's keys and values so far."""
        start = self._lengths.get(layer_idx, 0)
        end = start + k.shape[2]
        k_buf, v_buf = self._buffers.get(layer_idx, (k[:, :, :0], v[:, :, :0]))
        if end > k_buf.shape[2]:
            k_buf, v_buf = (_grown(buf, start, max(end + end // 2, 64)) for buf in (k_buf, v_buf))
            self._buffers[layer_idx] = (k_buf, v_buf)
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        self._lengths[layer_idx] = end
        return k_buf[:, :, :end], v_buf[:, :, :end]


def _grown(buffer: Tensor, length: int, capacity: int) -> Tensor:
    """A (B, heads, capacity, d) buffer holding the first ``length`` positions of ``buffer``."""
    grown = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[-1])
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


@dataclass
class AttentionInputs:
    """What every attention module needs besides the hidden states; built once per forward."""

    cos: Tensor
    sin: Tensor
    past_len: int
    key_valid: Tensor | None  # (B, keys) True for real tokens; None: no padding
    sdpa_mask: Tensor | None  # (B, 1, N, keys) bool for SDPA; None: plain causal


def causal_key_mask(rows: Tensor, past_len: int, key_valid: Tensor | None, num_keys: int) -> Tensor:
    """(B, R, keys) bool: key j is visible to the query at chunk position r iff j <= past_len + r
    and j is a real token. A query always sees itself, so a padded row never has an empty softmax."""
    keys = torch.arange(num_keys, device=rows.device)
    query_pos = (rows + past_len).unsqueeze(-1)
    visible = keys <= query_pos
    if key_valid is not None:
        visible = visible & (key_valid.unsqueeze(1) | (keys == query_pos))
    return visible


def build_attention_inputs(
    cos: Tensor, sin: Tensor, past_len: int, key_valid: Tensor | None
) -> AttentionInputs:
    """The SDPA mask is only built when causal alone is wrong: padding, or a chunk after a cache."""
    batch, n = cos.shape[:2]
    num_keys = past_len + n
    if key_valid is not None and bool(key_valid.all()):
        key_valid = None
    sdpa_mask = None
    if key_valid is not None or (past_len > 0 and n > 1):
        rows = torch.arange(n, device=cos.device).expand(batch, n)
        sdpa_mask = causal_key_mask(rows, past_len, key_valid, num_keys).unsqueeze(1)
    return AttentionInputs(cos=cos, sin=sin, past_len=past_len, key_valid=key_valid, sdpa_mask=sdpa_mask)


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x: (B, heads, N, d), rows: (B, R) -> (B, heads, R, d)."""
    index = rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return torch.gather(x, 2, index)


class Attention(nn.Module):
    """Causal grouped-query self-attention through fused SDPA (no attention map materialised)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        dim, kv_dim = config.hidden_size, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:-1], heads, self.head_dim).transpose(-3, -2)

    def qkv(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), inputs.cos, inputs.sin)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), inputs.cos, inputs.sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return q, k, v

    def sequence_attention(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs) -> Tensor:
        n = q.shape[2]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=inputs.sdpa_mask, is_causal=inputs.sdpa_mask is None and n > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )

    def row_scores(self, q_rows: Tensor, k: Tensor) -> Tensor:
        """Scaled scores of a few query rows against all keys: (B, heads, R, d) x (B, kv_heads, keys, d)
        -> (B, heads, R, keys). Query heads are grouped onto their kv head, no key copy."""
        b, h, r, d = q_rows.shape
        grouped = q_rows.reshape(b, self.num_kv_heads, (h // self.num_kv_heads) * r, d)
        scores = grouped @ k.transpose(-1, -2) / math.sqrt(d)
        return scores.view(b, h, r, k.shape[2])

    def row_values(self, probs: Tensor, v: Tensor) -> Tensor:
        """(B, heads, R, keys) x (B, kv_heads, keys, d) -> (B, heads, R, d)."""
        b, h, r, n = probs.shape
        out = probs.reshape(b, self.num_kv_heads, (h // self.num_kv_heads) * r, n) @ v
        return out.view(b, h, r, v.shape[-1])

    def output(self, out: Tensor) -> Tensor:
        """(B, heads, N, d) attention output -> (B, N, D) through o_proj."""
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        q, k, v = self.qkv(x, inputs, cache)
        return self.output(self.sequence_attention(q, k, v, inputs))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: Attention = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> Tensor:
        return self.feed_forward(x + self.self_attn(self.input_layernorm(x), inputs, cache))

    def feed_forward(self, x: Tensor) -> Tensor:
        """The second half of the block, after the attention residual: x + MLP(norm(x))."""
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class LanguageModel(nn.Module):
    """LLaMA-family causal LM on input embeddings, with an optional KV cache."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def position_ids(self, attention_mask: Tensor | None, batch: int, n: int, past_len: int, device) -> Tensor:
        """Positions count real tokens only, so left padding does not shift them (as HF generate)."""
        if attention_mask is None:
            return torch.arange(past_len, past_len + n, device=device).expand(batch, n)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -n:]

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.model.rotary_emb(position_ids, dtype)

    def attention_inputs(
        self, inputs_embeds: Tensor, attention_mask: Tensor | None, cache: KVCache | None,
        position_ids: Tensor | None = None,
    ) -> AttentionInputs:
        """RoPE tables and masks for one forward. ``attention_mask`` (B, past + N) covers cached keys too."""
        batch, n, _ = inputs_embeds.shape
        past_len = len(cache) if cache is not None else 0
        if position_ids is None:
            position_ids = self.position_ids(attention_mask, batch, n, past_len, inputs_embeds.device)
        cos, sin = self.rope(position_ids, inputs_embeds.dtype)
        key_valid = attention_mask.bool() if attention_mask is not None else None
        return build_attention_inputs(cos, sin, past_len, key_valid)

    def checkpointed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, recomputed in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Hidden states after the final norm. ``attention_mask`` (B, past + N) covers cached keys too."""
        inputs = self.attention_inputs(inputs_embeds, attention_mask, cache, position_ids)
        x = inputs_embeds
        for layer in self.model.layers:
            x = self.checkpointed(layer, x, inputs, cache)
        return self.model.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
