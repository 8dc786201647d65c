"""The Qwen2 family: LLaMA's decoder with q/k/v bias, its RoPE theta and RMSNorm eps, and tied
embeddings in its small models. transformers' ``Qwen2ForCausalLM`` uses LLaMA's names, so a Qwen2
checkpoint loads under them; sliding-window attention (``use_sliding_window``, off in the released
models) is not implemented, and such a config.json is refused (``qwen2_config_from_hf``)."""

from __future__ import annotations

from dataclasses import dataclass

from flexvlm.models.decoder import DecoderConfig, LanguageModel, config_from_hf
from flexvlm.models.llm import llama_stack


@dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """Qwen2-7B's values by default."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int | None = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True
    max_position_embeddings: int = 32768

    presets = {
        "qwen2-7b": {},
        "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                           num_kv_heads=2, tie_word_embeddings=True),
    }


class Qwen2(LanguageModel):
    """Qwen2 / Qwen2.5; in a YAML ``llm: qwen2-7b``, or by class_path with ``init_args: {config: {...}}``."""

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config, llama_stack(config))


_HF_QWEN2_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def qwen2_config_from_hf(hf: dict, source: str = "config.json") -> Qwen2Config:
    """A transformers Qwen2 config as a Qwen2Config: q/k/v bias always; sliding windows refused."""
    sliding = hf.get("use_sliding_window")
    problems = ["use_sliding_window: the decoder implements full attention only"] if sliding else []
    return config_from_hf(Qwen2Config, hf, _HF_QWEN2_DEFAULTS, ("silu",), problems, source, attention_bias=True)
