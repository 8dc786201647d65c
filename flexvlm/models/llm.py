"""The LLaMA family (LLaMA, Vicuna): RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache.

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``...),
so a LLaMA / Vicuna state dict loads without a rename table. Its attention (optional q/k/v bias, a
head size of its own), norm and MLP are the pieces the Qwen2 and Gemma families reuse. The interface
they implement, and what FlexAttention uses of them, is ``flexvlm.models.decoder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.models.decoder import (
    AttentionInputs, DecoderAttention, DecoderConfig, DecoderLayer, DecoderStack, KVCache, LanguageModel,
    RotaryEmbedding, apply_rope, config_from_hf,
)


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """LLaMA-2-7B's values by default."""

    presets = {
        # the built-in synthetic task's decoder (docs/synthetic-task.md: width 64, 4 heads, 3 layers)
        "tiny": dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                     max_position_embeddings=512),
        "small": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, max_position_embeddings=2048),
        "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                               max_position_embeddings=2048),
        "llama-2-7b": {},
        "vicuna-7b-v1.5": {},
        "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
        "vicuna-13b-v1.5": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
    }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def normalised(self, x: Tensor) -> Tensor:
        """``x`` over its root mean square, in float32 (as LLaMA and Gemma compute it)."""
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * self.normalised(x).to(x.dtype)  # cast back before the scale, as LLaMA


class Attention(DecoderAttention):
    """Causal grouped-query self-attention through fused SDPA (no attention map materialised), with
    q/k/v bias when the config asks for it (Qwen2)."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        dim, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(dim, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, dim, bias=False)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:-1], heads, self.head_dim).transpose(-3, -2)

    def qkv(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor]:
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), inputs.cos, inputs.sin)
        k, v = self.keys_values(x, inputs.cos, inputs.sin, self.k_proj, self.v_proj)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return q, k, v

    def keys_values(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_proj: nn.Module, v_proj: nn.Module
    ) -> tuple[Tensor, Tensor]:
        k = apply_rope(self._heads(k_proj(x), self.num_kv_heads), cos, sin)
        return k, self._heads(v_proj(x), self.num_kv_heads)

    def output(self, out: Tensor) -> Tensor:
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU (LLaMA), GeGLU with tanh GELU (Gemma)."""

    def __init__(self, config: DecoderConfig, activation: Callable[[Tensor], Tensor] = F.silu) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(DecoderLayer):
    """x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: DecoderConfig, layer_idx: int, norm: type[nn.Module] = RMSNorm,
                 activation: Callable[[Tensor], Tensor] = F.silu) -> None:
        super().__init__()
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, activation)

    def attention_input(self, x: Tensor) -> Tensor:
        return self.input_layernorm(x)

    def after_attention(self, x: Tensor, attention_out: Tensor) -> Tensor:
        x = x + attention_out
        return x + self.mlp(self.post_attention_layernorm(x))


def llama_stack(config: DecoderConfig, norm: type[nn.Module] = RMSNorm,
                activation: Callable[[Tensor], Tensor] = F.silu) -> DecoderStack:
    """Embeddings, LLaMA layers with ``norm`` and the MLP's ``activation``, final norm, RoPE."""
    return DecoderStack(
        nn.Embedding(config.vocab_size, config.hidden_size),
        [LlamaLayer(config, i, norm, activation) for i in range(config.num_layers)],
        norm(config.hidden_size, config.rms_norm_eps),
        RotaryEmbedding(config.head_dim, config.rope_theta),
    )


class Llama(LanguageModel):
    """LLaMA / Vicuna; in a YAML ``llm: {class_path: flexvlm.models.llm.Llama, init_args: {config: {...}}}``,
    or a preset's name (``llm: vicuna-7b-v1.5``)."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config, llama_stack(config))


# transformers' defaults of each family's config, for the keys a config.json leaves out (llava-hf saves
# only the keys that differ from them: its 7B `text_config` names the vocabulary, 32064, not the sizes)
_HF_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def llama_config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """A transformers LLaMA config (`config.json`, or llava-hf's `text_config`) as a LlamaConfig."""
    return config_from_hf(LlamaConfig, hf, _HF_LLAMA_DEFAULTS, ("silu",), [], source,
                           attention_bias=hf.get("attention_bias", False))
