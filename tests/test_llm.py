"""The decoder against transformers' own Llama / Qwen2 with the same random weights."""

import pytest
import torch

from flexvlm.models.llm import KVCache, LanguageModel, LlamaConfig

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=2,
             max_position_embeddings=128)


def _pair(attention_bias: bool, tie: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, attention_bias=attention_bias, rope_theta=500.0, tie_word_embeddings=tie)
    kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
                  rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
                  max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=tie)
    if attention_bias:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs, use_sliding_window=False))
    else:
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs, attention_bias=False))
    ref.eval()
    ours = LanguageModel(config).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in name for name in missing), (missing, unexpected)
    return ours, ref


def _logits(model: LanguageModel, ids, mask=None, cache=None):
    return model.logits(model(model.embed(ids), attention_mask=mask, cache=cache))


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2"])
def test_logits_match_transformers(bias):
    ours, ref = _pair(bias, tie=bias)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = ref(ids).logits
        got = _logits(ours, ids)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2"])
def test_kv_cache_matches_transformers_incremental(bias):
    ours, ref = _pair(bias)
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


def test_left_padding_matches_transformers():
    ours, ref = _pair(False)
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
    with pytest.raises(ValueError, match="valid presets"):
        LlamaConfig.from_name("llama-9000")
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(hidden_size=60, num_heads=8)


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
