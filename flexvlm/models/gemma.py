"""The Gemma family (Gemma 1): LLaMA's block with three differences, RMSNorm scaling by (1 + weight),
token embeddings multiplied by sqrt(hidden_size), and a GeGLU MLP (tanh-approximated GELU); its heads
have a size of their own (256), not hidden_size / num_heads, and its embeddings are tied.
transformers' ``GemmaForCausalLM`` uses LLaMA's names, so a Gemma checkpoint loads under them.

As in transformers, the scale applies to token embeddings only: image tokens spliced into the
sequence, and the high-res tokens FlexAttention projects, enter as the projector gives them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from flexvlm.models.decoder import DecoderConfig, LanguageModel, config_from_hf
from flexvlm.models.llm import RMSNorm, llama_stack

gelu_tanh = partial(F.gelu, approximate="tanh")


@dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """Gemma-7B's values by default."""

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_layers: int = 28
    num_heads: int = 16
    head_size: int | None = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    presets = {
        "gemma-7b": {},
        "gemma-2b": dict(hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8, num_kv_heads=1),
    }


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight) in float32, the weight starting at zero."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return (self.normalised(x) * (1.0 + self.weight.float())).type_as(x)


class Gemma(LanguageModel):
    """Gemma; in a YAML ``llm: gemma-2b``, or by class_path with ``init_args: {config: {...}}``."""

    config_class = GemmaConfig

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__(config, llama_stack(config, norm=GemmaRMSNorm, activation=gelu_tanh))

    def embed(self, input_ids: Tensor) -> Tensor:
        embeds = super().embed(input_ids)
        # the scale in the embeddings' dtype, as transformers casts it
        return embeds * embeds.new_tensor(self.config.hidden_size**0.5)


_HF_GEMMA_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
}


def gemma_config_from_hf(hf: dict, source: str = "config.json") -> GemmaConfig:
    """A transformers Gemma (1) config as a GemmaConfig. Gemma's released configs say `gelu`, which
    transformers reads as the tanh approximation, as flexvlm does."""
    problems = ["attention_bias: Gemma's projections have no bias in flexvlm"] if hf.get("attention_bias") else []
    return config_from_hf(GemmaConfig, hf, _HF_GEMMA_DEFAULTS, ("gelu", "gelu_pytorch_tanh"), problems, source)
