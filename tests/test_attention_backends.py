"""Every attention backend against a naive loop over samples, heads and rows (explicit softmax of the
scaled scores over the keys a row sees), with grouped-query heads and each kind of mask."""

import math

import pytest
import torch

from flexvlm.attention import ATTENTION_BACKENDS, LseUnavailable, build_backend

B, HEADS, KV_HEADS, ROWS, KEYS, D = 2, 4, 2, 5, 9, 8
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")])]


def naive(q, k, v, seen, bias):
    """(out, lse) by loops: row r of head h sees keys j with seen[b, h, r, j], scores + bias."""
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            g = h // (q.shape[1] // k.shape[1])
            for r in range(q.shape[2]):
                keys = [j for j in range(k.shape[2]) if seen[b, h, r, j]]
                scores = torch.stack([q[b, h, r] @ k[b, g, j] / math.sqrt(q.shape[-1]) + bias[b, h, r, j]
                                      for j in keys])
                lse[b, h, r] = torch.logsumexp(scores, 0)
                weights = torch.exp(scores - lse[b, h, r])
                out[b, h, r] = sum(w * v[b, g, j] for w, j in zip(weights, keys))
    return out, lse


def _inputs(kind, seed=0):
    """q, k, v and a mask of ``kind`` -> (q, k, v, mask, is_causal, seen (B, heads, R, keys), bias)."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, HEADS, ROWS, D), torch.randn(B, KV_HEADS, KEYS, D), torch.randn(B, KV_HEADS, KEYS, D)
    seen = torch.ones(B, HEADS, ROWS, KEYS, dtype=torch.bool)
    bias = torch.zeros(B, HEADS, ROWS, KEYS)
    mask, causal = None, False
    if kind == "causal":
        causal = True
        seen = seen & torch.ones(ROWS, KEYS, dtype=torch.bool).tril()
    elif kind in ("bool", "additive"):
        rows_see = torch.rand(B, 1, ROWS, KEYS) < 0.5
        rows_see[..., 0] = True  # every row sees a key
        seen = rows_see.expand_as(seen)
        mask = rows_see
        if kind == "additive":  # a soft selection's weights on the keys seen
            mask = (-3 * torch.rand(B, 1, ROWS, KEYS)).masked_fill(~rows_see, float("-inf"))
            bias = mask.masked_fill(~rows_see, 0.0).expand_as(bias)
    return q, k, v, mask, causal, seen, bias


KINDS = ["none", "causal", "bool", "additive"]


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["eager", "sdpa"])
def test_backend_matches_the_naive_loops_with_its_lse(name, kind, device):
    q, k, v, mask, causal, seen, bias = _inputs(kind)
    expected, expected_lse = naive(q, k, v, seen, bias)
    q, k, v, mask = _on(device, q, k, v, mask)
    backend = build_backend(name)
    out, lse = backend(q, k, v, mask, causal)
    assert lse is None
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    out, lse = backend(q, k, v, mask, causal, return_lse=True)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sdpa"])
def test_gradients_through_the_lse_kernels_are_the_reference_backends(name):
    """The lse path of a fused backend trains: the gradients of its output are eager's; its lse carries
    none (the kernels' lse is an output without a derivative: maps that need a gradient are eager's)."""
    grads = {}
    for backend in (name, "eager"):
        q, k, v, mask, _, _, _ = _inputs("additive", seed=1)
        for t in (q, k, v):
            t.requires_grad_(True)
        out, lse = build_backend(backend)(q, k, v, mask, return_lse=True)
        assert lse.requires_grad == (backend == "eager")
        out.square().sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for fused, reference in zip(grads[name], grads["eager"]):
        torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_flex_attention_matches_the_naive_loops(kind, device):
    """flex_attention compiled: its forward pass on CPU (this torch has no CPU backward, nor lse); on a
    GPU its lse too."""
    q, k, v, mask, causal, seen, bias = _inputs(kind)
    expected, expected_lse = naive(q, k, v, seen, bias)
    q, k, v, mask = _on(device, q, k, v, mask)
    with torch.no_grad():
        out, lse = build_backend("flex")(q, k, v, mask, causal, return_lse=device == "cuda")
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    if device == "cuda":
        torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-5, rtol=1e-5)


def test_flex_attention_refuses_what_cpu_cannot_do_with_the_reason():
    q, k, v, mask, *_ = _inputs("bool")
    with torch.no_grad(), pytest.raises(LseUnavailable, match="no log-sum-exp on CPU"):
        build_backend("flex")(q, k, v, mask, return_lse=True)
    with pytest.raises(NotImplementedError, match="backward pass does not run on CPU"):
        build_backend("flex")(q.requires_grad_(True), k, v, mask)


def test_backends_are_registered_by_name():
    assert set(ATTENTION_BACKENDS.names()) >= {"eager", "sdpa", "flex"}
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        build_backend("flash")
