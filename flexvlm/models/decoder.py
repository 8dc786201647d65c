"""The decoder interface: what FlexVLM and FlexAttention ask of a language model, and the pieces every
family shares (config fields, RoPE, KV cache, masks, grouped-query attention math).

flexvlm's decoders keep the layout and names that transformers' LLaMA, Qwen2 and Gemma share
(``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn, post_attention_layernorm,
mlp}``, ``model.norm``, ``lm_head``), so that their checkpoints load under their own names. A family
is a sibling module (``llm.py``: LLaMA / Vicuna, ``qwen2.py``, ``gemma.py``) that provides:

- a ``DecoderConfig`` subclass with the family's defaults and its ``presets``;
- a ``LanguageModel`` subclass, ``__init__(self, config)``, that builds its ``DecoderStack`` and
  overrides what the family does differently (Gemma: ``embed``);
- its layers (``DecoderLayer``) and attention (``DecoderAttention``), the parts FlexAttention needs:
  q / k / v with RoPE and the cache, keys and values of other tokens through other projections,
  fused attention, scores and values of a few rows, the output projection, head counts and size.

README.md, "Adding an LLM family", lists the steps; ``flexvlm/models/families.py`` names the families.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from flexvlm.attention import AttentionBackend, SdpaAttention
from flexvlm.weights import raise_mismatches


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder is built from; LLaMA-2-7B's values by default, a family's subclass sets its own
    defaults and ``presets`` (name -> the fields that differ from those defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: multi-head attention (= num_heads)
    head_size: int | None = None  # None: hidden_size // num_heads (Gemma's is its own)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # q/k/v bias, as in Qwen2
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if self.head_size is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DecoderConfig:
        """A preset of this family, optionally changed (``LlamaConfig.from_name("vicuna-7b-v1.5", num_layers=2)``)."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; valid presets: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})


# -- RoPE ------------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """cos / sin tables of rotary position embedding (the 'rotate half' layout of LLaMA)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The frequencies; called again once a model built on the meta device has memory (``to_empty``
        leaves this non-persistent buffer uninitialised, and no checkpoint holds it)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.inv_freq.device) / self.head_dim
        self.inv_freq.copy_(1.0 / (self.theta**exponents))

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (..., heads, N, d); cos, sin: (..., N, d)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    return x * cos + rotate_half(x) * sin


# -- cache and masks ---------------------------------------------------------------------------------
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


@dataclass
class PromptPositions:
    """Position ids that an architecture gives its prompts in place of the decoder's count of real tokens
    (Qwen2-VL's multimodal RoPE: (3, B, N) ids, image tokens placed on their grid). A token after the prompt
    (a cached step) is at its index among its sample's real tokens plus the sample's delta, the prompt's largest
    position + 1 minus its number of real tokens, as transformers generates: text goes on counting from there."""

    prompt: Tensor  # (3, B, N) or (B, N) int64 of the whole prompt; 0 at padding
    deltas: Tensor  # (B, 1) int64

    def of_chunk(self, llm: LanguageModel, attention_mask: Tensor | None, n: int, past_len: int) -> Tensor:
        """The positions of a forward's ``n`` tokens after ``past_len`` cached ones: the prompt's own (a forward
        or prefill of the whole prompt), or those of tokens after it."""
        if past_len == 0:
            if n != self.prompt.shape[-1]:
                raise ValueError(f"a forward from the start holds {n} tokens, the prompt's positions "
                                 f"{self.prompt.shape[-1]}")
            return self.prompt
        return llm.position_ids(attention_mask, self.deltas.shape[0], n, past_len, self.deltas.device) + self.deltas


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


# -- the interface ------------------------------------------------------------------------------------
class DecoderAttention(nn.Module):
    """Causal self-attention in the pieces FlexAttention recombines. A family's subclass sets
    ``layer_idx``, ``num_heads``, ``num_kv_heads``, ``head_dim`` and ``k_proj``, ``v_proj`` (W_K, W_V:
    FlexAttention's W_K', W_V' are copies of these modules, bias included), keeps every parameter in
    child modules (FlexAttention shares them), and implements ``qkv``, ``keys_values`` and
    ``output``. The rest is grouped-query attention with 1 / sqrt(d) scaling; a family that scales
    or masks scores differently overrides ``attend`` and ``row_scores`` together."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    backend: AttentionBackend = SdpaAttention()  # the kernel ``attend`` calls (FlexVLM's ``attn_backend``)

    def qkv(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, heads, N, d) with RoPE; keys with RoPE and values (B, kv_heads, keys, d) of the
        cached tokens (if any) followed by those of ``x`` (B, N, D), which are appended to ``cache``."""
        raise NotImplementedError

    def keys_values(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_proj: nn.Module, v_proj: nn.Module
    ) -> tuple[Tensor, Tensor]:
        """Keys with RoPE and values (..., kv_heads, N, d) of tokens ``x`` (..., N, D) at RoPE ``cos``, ``sin``
        (..., N, d), through ``k_proj``, ``v_proj``: W_K, W_V for the sequence, W_K', W_V' for high-res
        tokens (a batch, or a flat list of them)."""
        raise NotImplementedError

    def output(self, out: Tensor) -> Tensor:
        """(B, heads, N, d) attention output -> (B, N, D) through the output projection."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False,
               return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        """Fused attention, no map materialised: queries (B, heads, R, d) over keys and values
        (B, kv_heads, keys, d), ``mask`` (B, 1, R, keys) bool (True: visible), float (added to the
        scores; -inf: hidden) or None; through the layer's ``backend``. -> (output (B, heads, R, d),
        with ``return_lse`` each row's log-sum-exp of its scores (B, heads, R), else None; a backend
        that cannot give it raises ``LseUnavailable``)."""
        return self.backend(q, k, v, mask, is_causal, return_lse)

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

    def sequence_attention(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs,
                           return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        """Every query row over its causal keys: ``attend``'s (output, lse)."""
        return self.attend(q, k, v, inputs.sdpa_mask, is_causal=inputs.sdpa_mask is None and q.shape[2] > 1,
                           return_lse=return_lse)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        q, k, v = self.qkv(x, inputs, cache)
        return self.output(self.sequence_attention(q, k, v, inputs)[0])


class DecoderLayer(nn.Module):
    """One block, split around its attention so that FlexVLM can call the attention alone (with
    high-res keys): ``forward`` is ``after_attention(x, self_attn(attention_input(x)))``. In
    FlexAttention layers ``self_attn`` is a FlexAttention that wraps the family's attention."""

    self_attn: DecoderAttention

    def attention_input(self, x: Tensor) -> Tensor:
        """The residual stream -> the attention's input (LLaMA: the input norm)."""
        raise NotImplementedError

    def after_attention(self, x: Tensor, attention_out: Tensor) -> Tensor:
        """The residual stream and the attention's output -> the block's output."""
        raise NotImplementedError

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None,
                variant: Callable[..., Any] | None = None, *variant_args: Any) -> Any:
        """The plain block, or ``variant(self, x, inputs, cache, *variant_args)``: the block computed
        another way (FlexVLM's flex and cross-attention layers), its other inputs passed as arguments.
        Run here, so that what wraps a layer's forward (FSDP2 gathering a sharded layer's weights,
        hooks) sees every use of the layer."""
        if variant is not None:
            return variant(self, x, inputs, cache, *variant_args)
        return self.after_attention(x, self.self_attn(self.attention_input(x), inputs, cache))


class DecoderStack(nn.Module):
    """transformers' ``model``: token embeddings, the layers, the final norm and the RoPE tables."""

    def __init__(self, embed_tokens: nn.Embedding, layers: list[DecoderLayer], norm: nn.Module,
                 rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb


class LanguageModel(nn.Module):
    """A causal decoder on input embeddings, with an optional KV cache: what FlexVLM drives. A family
    subclasses it with ``__init__(self, config)`` (the signature a YAML's ``init_args`` fill) and
    ``config_class``, and overrides what it does differently."""

    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig

    def __init__(self, config: DecoderConfig, model: DecoderStack) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """``lm_head`` shares the token embeddings when the config ties them (again after ``to_empty``,
        which gives each module its own tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        return self.final_norm(x)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.model.norm(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)


def config_from_hf(
    config_class: type[DecoderConfig], hf: dict, defaults: dict, activations: tuple[str, ...], problems: list[str],
    source: str, **fields: Any,
) -> DecoderConfig:
    """A family's config from a transformers config.json (or llava-hf's `text_config`), an absent key
    meaning transformers' default (`defaults`), as in transformers itself. Settings that the decoder
    does not implement are refused: `problems` found by the family, an activation not in
    `activations`, a RoPE type other than the default."""
    hf, problems = {**defaults, **hf}, list(problems)
    act = hf.get("hidden_activation") or hf["hidden_act"]  # old Gemma configs name it hidden_activation
    if act not in activations:
        problems.append(f"hidden_act {act!r}: the decoder implements {' / '.join(activations)} only")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE type {rope_type!r}: the decoder implements the default RoPE only")
    raise_mismatches(problems, source, "decoder flexvlm implements")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    # a family whose transformers config sets a head size of its own (Gemma) keeps it; elsewhere it is
    # derived from the width, as a preset's is
    explicit_head = "head_dim" in defaults or head_dim != hidden // heads
    return config_class(**{
        "vocab_size": hf["vocab_size"], "hidden_size": hidden, "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"], "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads"),
        "head_size": head_dim if explicit_head else None,
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rms_norm_eps": hf["rms_norm_eps"],
        "max_position_embeddings": hf["max_position_embeddings"], "tie_word_embeddings": hf["tie_word_embeddings"],
        **fields,
    })
