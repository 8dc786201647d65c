"""Each decoder family against transformers' own (LlamaForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM)
with the same random weights: full forward, KV cache, left padding."""

import math

import pytest
import torch

from flexvlm.models.decoder import KVCache, LanguageModel
from flexvlm.models.families import preset
from flexvlm.models.gemma import Gemma, GemmaConfig
from flexvlm.models.llm import Llama, LlamaConfig
from flexvlm.models.qwen2 import Qwen2, Qwen2Config

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=2,
             max_position_embeddings=128, rope_theta=500.0)
# family -> (flexvlm's class, what differs from SMALL, transformers' classes, their extra settings)
FAMILIES = {
    "llama": (Llama, {}, "LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": (Qwen2, {}, "Qwen2ForCausalLM", "Qwen2Config", {"use_sliding_window": False}),
    # heads of their own size (not 64 / 8), as Gemma's 256 against 3072 / 16
    "gemma": (Gemma, {"head_size": 12}, "GemmaForCausalLM", "GemmaConfig", {"hidden_act": "gelu_pytorch_tanh"}),
}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1) activations instead of transformers' 0.02-std init, so that a wrong weight (or a norm weight
    read as w instead of 1 + w) shows in the logits."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        else:
            p.copy_(("norm" in name and name.endswith("weight")) + 0.1 * torch.randn_like(p))


def hf_kwargs(config) -> dict:
    """transformers' config arguments for one of flexvlm's decoder configs."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
                rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                max_position_embeddings=config.max_position_embeddings,
                tie_word_embeddings=config.tie_word_embeddings)


def transformers_pair(family: str, tie: bool = False) -> tuple[LanguageModel, torch.nn.Module]:
    """flexvlm's decoder of ``family`` and transformers' own, with the same random weights."""
    ours_class, fields, ref_name, config_name, extra = FAMILIES[family]
    config = ours_class.config_class(**SMALL, **fields, tie_word_embeddings=tie)
    ref_config = getattr(transformers, config_name)(**hf_kwargs(config), **extra)
    ref = getattr(transformers, ref_name)(ref_config).eval()
    randomise(ref)
    ours = ours_class(config).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, ref


def _logits(model: LanguageModel, ids, mask=None, cache=None):
    return model.logits(model(model.embed(ids), attention_mask=mask, cache=cache))


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("qwen2", False), ("gemma", True)])
def test_logits_match_transformers(family, tie):
    ours, ref = transformers_pair(family, tie)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = ref(ids).logits
        got = _logits(ours, ids)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_transformers_incremental(family):
    ours, ref = transformers_pair(family)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        cache = KVCache()
        chunks = [_logits(ours, ids[:, :5], cache=cache)]  # prefill of 5, a chunk of 4, then 1 by 1
        chunks.append(_logits(ours, ids[:, 5:9], cache=cache))
        for t in range(9, 12):
            chunks.append(_logits(ours, ids[:, t : t + 1], cache=cache))
    got = torch.cat(chunks, dim=1)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_transformers(family):
    ours, ref = transformers_pair(family)
    ids = torch.randint(4, SMALL["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # second row left-padded by three
    ids[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=position_ids).logits
        got = _logits(ours, ids, mask)
    # padded query rows are meaningless: compare the real ones
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-4


def test_presets_and_errors():
    assert LlamaConfig.from_name("vicuna-7b-v1.5").head_dim == 128
    assert LlamaConfig.from_name("vicuna-13b-v1.5", num_layers=2).num_layers == 2
    family, config = preset("qwen2-7b")
    assert family is Qwen2 and config == Qwen2Config() and config.attention_bias and config.kv_heads == 4
    family, config = preset("gemma-7b", num_layers=2)
    assert family is Gemma and config.head_dim == 256 and config.num_layers == 2 and config.tie_word_embeddings
    assert preset("tiny")[0] is Llama
    with pytest.raises(ValueError, match="valid presets"):
        LlamaConfig.from_name("llama-9000")
    with pytest.raises(ValueError, match=r"valid presets: \[.*'gemma-2b'.*'qwen2-0.5b'.*'vicuna-7b-v1.5'"):
        preset("llama-9000")
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(hidden_size=60, num_heads=8)
    assert GemmaConfig(hidden_size=60, num_heads=8, num_kv_heads=1).head_dim == 256  # its own head size


def test_kv_cache_grows_in_place_and_returns_what_concatenation_would():
    cache = KVCache()
    keys, values = [], []
    for n in (5, 1, 70, 1, 1, 130):  # crosses the first capacity (64) and a growth
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = cache.update(0, k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=2)) and torch.equal(got_v, torch.cat(values, dim=2))
    assert len(cache) == 208
