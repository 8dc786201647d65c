"""The Qwen2 family: LLaMA's decoder with q/k/v bias, its RoPE theta and RMSNorm eps, and tied
embeddings in its small models. transformers' ``Qwen2ForCausalLM`` uses LLaMA's names, so a Qwen2
checkpoint loads under them; sliding-window attention (``use_sliding_window``, off in the released
models) is not implemented, and such a config.json is refused (``qwen2_config_from_hf``).

Qwen2-VL / Qwen2.5-VL's decoder is this one with multimodal RoPE (``mrope_section``): each token has three
positions (temporal, height, width), given as (3, B, L) position ids, and the rotary frequencies are split into
three runs that turn with one of them each (``mrope_cos_sin``). Where the positions come from is the
architecture's (``flexvlm.architectures.qwen2_vl.positions``); (B, L) ones are the same on the three axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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
    # multimodal RoPE: how many of the head_dim / 2 rotary frequencies turn with the temporal, height and width
    # position (Qwen2-VL / Qwen2.5-VL); None: the ordinary 1-D RoPE
    mrope_section: tuple[int, ...] | None = None

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

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos / sin (B, L, head_dim); with ``mrope_section``, of (3, B, L) or (B, L) position ids."""
        if self.config.mrope_section is None:
            return super().rope(position_ids, dtype)
        return mrope_cos_sin(position_ids, self.model.rotary_emb.inv_freq, self.config.mrope_section, dtype)


def mrope_cos_sin(position_ids: Tensor, inv_freq: Tensor, mrope_section: Sequence[int],
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos / sin (B, L, head_dim) of (3, B, L) positions ((B, L) ones: the same position on the three axes), for
    the decoder's ``inv_freq`` (head_dim / 2,) split by ``mrope_section``: its i-th run of frequencies turns with
    axis i % 3 (temporal, height, width); computed in float32, as transformers does."""
    section = [int(s) for s in mrope_section]
    if sum(section) != inv_freq.numel():
        raise ValueError(f"mrope_section {section} sums to {sum(section)}, not to the {inv_freq.numel()} rotary "
                         f"frequencies (head_dim / 2)")
    if position_ids.ndim == 2:
        position_ids = position_ids.expand(3, -1, -1)
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids {tuple(position_ids.shape)}: expected (3, B, L) or (B, L)")
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)  # (3, B, L, head_dim / 2)
    angles = torch.cat([run[i % 3] for i, run in enumerate(freqs.split(section, dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)  # the rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


_HF_QWEN2_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def qwen2_config_from_hf(hf: dict, source: str = "config.json") -> Qwen2Config:
    """A transformers Qwen2 config (or Qwen2-VL's text config) as a Qwen2Config: q/k/v bias always; sliding
    windows refused; ``mrope_section`` from the RoPE parameters (older configs spell them ``rope_scaling`` with
    ``type: mrope``, which is the default RoPE with that section)."""
    sliding = hf.get("use_sliding_window")
    problems = ["use_sliding_window: the decoder implements full attention only"] if sliding else []
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if rope.get("rope_type", rope.get("type")) == "mrope":
        hf = {**hf, "rope_parameters": {**rope, "rope_type": "default"}}
    return config_from_hf(Qwen2Config, hf, _HF_QWEN2_DEFAULTS, ("silu",), problems, source, attention_bias=True,
                          mrope_section=tuple(int(s) for s in section) if section else None)
